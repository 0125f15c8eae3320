#!/usr/bin/env bash
# One command for a TPU host (one v5e/v5p/v6e chip is used): installs the project with
# jax[tpu] in a fresh venv and prints the tables of benchmarks/gpu_attention.py (blockwise
# vs the Mosaic Pallas kernel, attention fwd+bwd at 8k/32k/128k, and a ~1B train step at 32k).
#   bash benchmarks/tpu_attention.sh [extra arguments of benchmarks/gpu_attention.py]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/boundless_tpu_venv
. /tmp/boundless_tpu_venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-tpu.txt
python -c "import jax; print(jax.devices())"
python -m benchmarks.gpu_attention "$@"
