#!/usr/bin/env bash
# Every GPU check in one script, for a machine with one CUDA GPU: the tests marked cuda, the
# default suite on the device, ViT-B/16 extraction in bf16 against the bare forward, a JPEG folder
# to stored activations, and the SAE peer benchmark on the device. At most 10 minutes (the steps'
# limits added up); the default suite is the long step and did not finish in 150 s on an H200.
# Figures land under benchmarks/results/ (or $GPU_CHECK_OUT); benchmarks/README.md has the last ones.
#   bash benchmarks/gpu_check.sh
# A machine that cannot reach the package registries: install the wheels of the missing packages
# yourself and name its Python, e.g. PY=python3 PYTHONPATH=/tmp/site bash benchmarks/gpu_check.sh
# Each step has its own time limit and a failed step does not stop the ones after it; the script
# exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=offline SPECTRA_TRACKER=disabled PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PY:-}" ]; then
  make install || exit 1
  PY=.venv/bin/python
fi
out=${GPU_CHECK_OUT:-benchmarks/results}
mkdir -p "$out"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/gpu_NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" > >(tee "$out/gpu_$name.txt") 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" \
  | tee "$out/gpu_device.txt" || exit 1
step tests 60 "$PY" -m pytest -q -m cuda -rs -p no:cacheprovider tests/test_cuda.py
root=$(mktemp -d)
step default_suite 210 env SPECTRA_DEVICE=cuda "$PY" -m pipelines.run --root "$root"
rm -rf "$root"
bench() {  # bench NAME SECONDS COMMAND...: its figures are the JSON it writes; the log goes to stdout
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" || failed+=("$name")
}
bench extraction 90 "$PY" benchmarks/bench_extraction.py --device cuda --configs vitb16 --layers -1 \
  --compute-dtype bfloat16 --vitb16-images 2048 --repeats 3 --headline-only --out "$out/extraction_cuda.json"
bench folder_ingest 120 "$PY" benchmarks/bench_folder_ingest.py --device cuda --compute-dtype bfloat16 \
  --model vit_base_patch16_224 --images 2048 --batch-size 256 --workers 4 8 16 --processes 8 16 --repeats 2 \
  --out "$out/folder_ingest_cuda.json"
bench sae_peers 100 "$PY" benchmarks/bench_sae_peers.py --device cuda --threads 8 --trainers ours,ours_bf16,sparsify \
  --train-tokens 8388608 --out "$out/sae_peers_cuda.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "every GPU check passed"
