#!/usr/bin/env bash
# One command for all set-up on a fresh machine: creates .venv/ with real SGLang 0.5.23 and this
# project installed (editable). On a machine without an NVIDIA GPU it installs the CPU build of
# torch and the CPU pieces SGLang needs (cpu_support/, see docs/cpu.md); with a GPU it installs
# SGLang with its normal dependencies. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if .venv/bin/python -c "import sglang_morph, sglang, sgl_kernel" 2>/dev/null \
   && [ "$(.venv/bin/python -c 'import sglang; print(sglang.__version__)')" = "$SGLANG_VERSION" ]; then
  echo "setup: .venv already complete ($(( $(date +%s) - start )) s)"
  exit 0
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found: installing sglang==$SGLANG_VERSION with its CUDA dependencies"
  "${PIP[@]}" "sglang==$SGLANG_VERSION"
  "${PIP[@]}" -e ".[test]"
else
  echo "setup: no GPU: installing the CPU build of torch and SGLang's pure-Python dependencies"
  cons=$(mktemp)
  printf 'torch==2.13.0\ntriton==3.8.0\n' > "$cons"
  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
  "${PIP[@]}" -c "$cons" torch==2.13.0 triton==3.8.0
  "${PIP[@]}" -c "$cons" --no-deps "sglang==$SGLANG_VERSION" torchvision==0.28.0
  "${PIP[@]}" -c "$cons" -r cpu_support/requirements-sglang-cpu.txt
  "${PIP[@]}" -c "$cons" ./cpu_support
  .venv/bin/python cpu_support/guard_torchvision.py
  # The project's own dependencies besides SGLang (whose torch pin the CPU build replaces).
  "${PIP[@]}" -c "$cons" 'gymnasium>=1.0' 'stable-baselines3>=2.3' matplotlib rich pytest ruff
  "${PIP[@]}" -c "$cons" --no-deps -e .
  rm -f "$cons"
fi
.venv/bin/python -m sglang_morph.compat
echo "setup: done in $(( $(date +%s) - start )) s"
