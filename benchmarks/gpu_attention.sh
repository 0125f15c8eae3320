#!/usr/bin/env bash
# One command for a GPU machine (one H100/H200, under 8 minutes): installs the project with
# JAX's CUDA wheels in a fresh venv and prints the tables of benchmarks/gpu_attention.py
# (blockwise vs cuDNN and the Triton Pallas kernel, attention fwd+bwd at 8k/32k/128k, and a
# ~1B train step at 32k).
#   bash benchmarks/gpu_attention.sh [extra arguments of benchmarks/gpu_attention.py]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv /tmp/boundless_gpu_venv
. /tmp/boundless_gpu_venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt "jax[cuda12]"
python -c "import jax; print(jax.devices())"
python -m benchmarks.gpu_attention "$@"
