#!/usr/bin/env bash
# The prepared GPU check (issue 15): GPU-marked tests + align throughput/MFU on a ~124M GPT-2, as JSON.
#
#   bash bench/device.sh                          # CUDA machine: pytest -m gpu, then the throughput run
#   bash bench/device.sh --device cpu --tiny      # any machine: tiny model, a few steps, < 30 s
#   bash bench/device.sh --peak-tflops 989.4      # override the card's dense bf16 peak
#
# No network. Writes ${OUT:-bench/out}/device.json (and gpu-tests.log beside it). Python: .venv/bin/python
# when it imports torch, else python3; the repository root goes on PYTHONPATH, so prefnoise needs no
# install, only its dependencies (torch, transformers, accelerate, polars, numpy, pytest for the tests).
# Every argument goes to bench/device_check.py (see its docstring for the FLOPs formula).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python=""
for candidate in "$root/.venv/bin/python" python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "device.sh: no Python with torch found (tried .venv/bin/python, python3, python)" >&2
    exit 2
fi
missing="$("$python" - <<'PY'
import importlib.util
names = ["torch", "transformers", "accelerate", "polars", "numpy", "tokenizers", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)"
if [ -n "$missing" ]; then
    echo "device.sh: $python lacks: $missing (install them, or carry wheels; see bench/device_check.py)" >&2
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$python" bench/device_check.py "$@"
