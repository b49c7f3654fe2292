#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) with any Python that has torch built for CUDA: nothing
# else is needed, neither SGLang nor this project installed. Arguments pass through to the
# script; the JSON goes to gpu_check.json in the current directory unless --out is given.
# PYTHON picks the interpreter (default: the checkout's .venv if there is one, else python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
args=("$@")
case " $* " in
  *" --out "* | *" --out="* | *" -h "* | *" --help "*) ;;
  *) args+=(--out gpu_check.json) ;;
esac
exec "$python" "$root/scripts/gpu_check.py" "${args[@]}"
