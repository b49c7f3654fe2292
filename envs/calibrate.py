"""``python -m envs.calibrate``: fit the simulator's iteration-time model to engine measurements.

Reads iteration samples from a live sglang-morph server (``--server URL`` fetches
``URL/morph/iterations``) or from a JSON file (``--samples FILE``), fits the linear model of
``envs.calibration`` and writes a calibration JSON. Coefficients the samples cannot identify
(e.g. the cost of a quantized layer when no layer was quantized) are taken from ``--base``, or
from the explicit ``--prefill-s-per-token`` / ``--quantized-layer-s`` / ``--swap-s-per-layer``
flags, and the report lists which ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

from envs.calibration import (
    DEFAULT_CALIBRATION,
    CalibrationError,
    IterationModel,
    fit_iteration_model,
    load_calibration,
    parse_samples,
    save_calibration,
)

_NAN = float("nan")
_UNKNOWN = IterationModel(_NAN, _NAN, _NAN, _NAN, _NAN, source="")
"""Base of ``--base none``: NaN marks what neither the samples nor a flag supplied."""


def _read_source(args: argparse.Namespace) -> tuple[object, str]:
    if args.server:
        url = args.server.rstrip("/") + "/morph/iterations"
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read()), f"measured: {url}"
    return json.loads(Path(args.samples).read_text()), f"samples file: {args.samples}"


def main(argv: list[str] | None = None) -> int:
    """Fit, print the coefficients and the fit report, write ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m envs.calibrate", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="base URL of a running sglang-morph server")
    source.add_argument("--samples", help="JSON file of iteration samples")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--base", default=str(DEFAULT_CALIBRATION),
                        help="calibration supplying coefficients the samples cannot identify "
                        "('none': every such coefficient must be given by a flag)")
    parser.add_argument("--source", help="provenance text stored in the file (default: input)")
    parser.add_argument("--prefill-s-per-token", type=float)
    parser.add_argument("--quantized-layer-s", type=float)
    parser.add_argument("--swap-s-per-layer", type=float)
    args = parser.parse_args(argv)
    try:
        fallback = _UNKNOWN if args.base == "none" else load_calibration(args.base)
        overrides = {
            "per_prefill_token_s": args.prefill_s_per_token,
            "per_quantized_layer_s": args.quantized_layer_s,
            "swap_s_per_layer": args.swap_s_per_layer,
        }
        fallback = replace(fallback, **{k: v for k, v in overrides.items() if v is not None})
        raw, where = _read_source(args)
        samples, swaps = parse_samples(raw)
        model, report = fit_iteration_model(samples, fallback, swaps, args.source or where)
        unknown = [n for n in report["from_fallback"] if math.isnan(getattr(model, n))]
        if unknown:
            raise CalibrationError(
                f"the samples cannot identify {', '.join(unknown)}; give them with flags or --base"
            )
    except (CalibrationError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if isinstance(raw, dict) and "note" in raw:
        report["samples_note"] = raw["note"]
    save_calibration(model, report, args.out)
    print(f"source: {model.source}")
    for name in ("base_s", "per_prefill_token_s", "per_decode_req_s", "per_quantized_layer_s",
                 "swap_s_per_layer"):
        origin = "from --base or flag" if name in report["from_fallback"] else "fitted"
        print(f"  {name:24s} {getattr(model, name) * 1e3:9.4f} ms  ({origin})")
    print(f"  samples {report['samples']}, R^2 {report['r2']:.4f}, "
          f"max relative error {report['max_rel_error']:.1%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
