"""Resolves the project's named data assets (model, traces, evaluation text) at run time.

The files are never part of this repository. Search order: ``$MORPH_DATA_DIR``, then
``../shared/data`` beside the checkout, then a user cache (``~/.cache/sglang-morph``) filled
from the public upstream and checked by sha256.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sglang_morph.paths import REPO_ROOT


@dataclass(frozen=True)
class Asset:
    """One named asset: its path inside a data dir, and where it comes from publicly."""

    name: str
    relpath: str
    files: dict[str, tuple[str, str | None]]
    """file path (relative to ``relpath``) -> (upstream URL, sha256 or None)."""


_HF = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K"
_AZURE = "https://raw.githubusercontent.com/Azure/AzurePublicDataset/b469a11/data"
_STORIES_HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

ASSETS: dict[str, Asset] = {
    "stories260K": Asset(
        "stories260K",
        "models/stories260K/hf",
        # The HF form is converted from llama2.c files (provenance/ in the shared data); its
        # upstream is the conversion of karpathy/tinyllamas stories260K.
        {f: (f"{_HF}/{f}", None) for f in _STORIES_HF_FILES},
    ),
    "azure-code": Asset(
        "azure-code",
        "traces/azure2023_code.csv",
        {
            "": (
                f"{_AZURE}/AzureLLMInferenceTrace_code.csv",
                "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6",
            )
        },
    ),
    "azure-conv": Asset(
        "azure-conv",
        "traces/azure2023_conv.csv",
        {
            "": (
                f"{_AZURE}/AzureLLMInferenceTrace_conv.csv",
                "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
            )
        },
    ),
    "mooncake": Asset(
        "mooncake",
        "traces/mooncake_synthetic.jsonl",
        {
            "": (
                "https://raw.githubusercontent.com/kvcache-ai/Mooncake/3cca71d/"
                "FAST25-release/traces/synthetic_trace.jsonl",
                "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131",
            )
        },
    ),
    "tinystories": Asset(
        "tinystories",
        "text/tinystories_sample.txt",
        {
            "": (
                "https://raw.githubusercontent.com/stanford-cs336/assignment1-basics/25a8a49/"
                "tests/fixtures/tinystories_sample.txt",
                "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43",
            )
        },
    ),
    "wikitext2": Asset(
        "wikitext2",
        "text/wikitext2_raw_test.txt",
        {
            "": (
                "https://raw.githubusercontent.com/Tylogi/TyloQuant/7989d03/wikitext2_raw_test.txt",
                "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
            )
        },
    ),
}

DEFAULT_MODEL = "stories260K"


class AssetNotFoundError(FileNotFoundError):
    """A named asset is in none of the searched places and could not be fetched."""


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data directories searched, in order (the user cache comes last)."""
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir))
    if os.environ.get("MORPH_DATA_DIR"):
        dirs.append(Path(os.environ["MORPH_DATA_DIR"]))
    dirs.append(REPO_ROOT.parent / "shared" / "data")
    dirs.append(cache_dir())
    return dirs


def cache_dir() -> Path:
    """Where assets fetched from their upstream are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sglang-morph" / "data"


def resolve(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the named asset; fetches it into the user cache when it is found nowhere.

    Raises AssetNotFoundError naming the asset, the places searched and the upstream URL.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    searched = search_dirs(data_dir)
    for base in searched:
        candidate = base / asset.relpath
        if candidate.exists():
            return candidate
    urls = [url for url, _ in asset.files.values()]
    error: Exception | None = None
    if download:
        try:
            return _download(asset)
        except Exception as err:  # network absent, checksum mismatch, ...
            error = err
    raise AssetNotFoundError(
        f"asset {name!r} ({asset.relpath}) not found in "
        + ", ".join(str(d) for d in searched)
        + f"; upstream: {urls[0]}"
        + ("" if len(urls) == 1 else f" (+{len(urls) - 1} files)")
        + (f"; download failed: {error}" if error else "")
        + ". Set MORPH_DATA_DIR to a directory holding it."
    )


def _download(asset: Asset) -> Path:
    target = cache_dir() / asset.relpath
    for sub, (url, sha) in asset.files.items():
        dest = target / sub if sub else target
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(dest.suffix + ".part")
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            out.write(resp.read())
        if sha is not None:
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
            if digest != sha:
                tmp.unlink()
                raise ValueError(f"sha256 mismatch for {url}: got {digest}, expected {sha}")
        tmp.rename(dest)
    return target


def resolve_model(model_path: str | None, data_dir: str | os.PathLike | None = None) -> str:
    """The model to serve: the given path (checked to exist) or the embedded default."""
    if model_path is None or model_path == DEFAULT_MODEL:
        return str(resolve(DEFAULT_MODEL, data_dir))
    path = Path(model_path)
    if not path.exists():
        raise AssetNotFoundError(f"model path does not exist: {model_path}")
    return str(path)
