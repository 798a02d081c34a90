#!/usr/bin/env bash
# Every GPU check in one script, for a machine with one CUDA GPU (about 8 minutes on an H200-class
# GPU once the venv is installed): the tests marked cuda, the default suite on the device, and the
# extraction benchmark with ViT-B/16 at 224 px. Figures land under benchmarks/results/.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline SPECTRA_TRACKER=disabled
make install
out=benchmarks/results
mkdir -p "$out"
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  | tee "$out/gpu_device.txt"
.venv/bin/python -m pytest -q -m cuda -rs tests/test_cuda.py 2>&1 | tee "$out/gpu_tests.txt"
root=$(mktemp -d)
SPECTRA_DEVICE=cuda .venv/bin/python -m pipelines.run --root "$root" 2>&1 | tail -n 25 | tee "$out/gpu_default_suite.txt"
rm -rf "$root"
.venv/bin/python benchmarks/bench_extraction.py --device cuda --configs mouse large vitb16 \
  --out "$out/extraction_cuda.json"
