#!/usr/bin/env bash
# The GPU benchmark in one command (issue 15, item 8): STDiT-XL steps in bf16 on a packed mixed batch with every
# attention backend that runs here, against a dense batch, compile on/off, per-attention-kind times; one
# `RESULT key=value ...` line each. Extra arguments go to benchmarks/gpu_bench.py (--budget, --steps, --compile,
# --tiny). Without CUDA it runs the tiny CPU version. Needs no network. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_bench.py "$@"
