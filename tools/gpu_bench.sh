#!/usr/bin/env bash
# One GPU session in one call: the `gpu` test marker, then the backbone and full-step training
# benchmarks at ViT-L/14 and ViT-g/14. Results (logs + last-line JSON) go to ${OUT:-gpu-results}.
# On the lent device machine: carry .whl (omegaconf, webdataset, braceexpand, submitit,
# simplejpeg wheels for its Python) and run `bash tools/gpu_bench.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
budget=${GPU_BENCH_SECONDS:-200}   # leave room within a short device lease
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/device.txt"
timeout $((budget / 3)) python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 \
  | tail -n 25 | tee "$OUT/gpu_tests.log"
for arch in vitl14 vitg14; do
  bs=32; [ "$arch" = vitg14 ] && bs=12
  timeout $((budget / 6)) python3 tools/bench_vit.py --arch $arch --multicrop --batch $bs \
    --dtype bf16 --backends sdpa,math --warmup 2 --steps 5 --peak-tflops 989 \
    > "$OUT/bench_vit_$arch.log" 2>&1
  tail -n 1 "$OUT/bench_vit_$arch.log"
done
timeout $((budget / 6)) python3 tools/bench_train.py --arch vitl14 --batch-size 32 --dtype bf16 \
  --warmup 2 --steps 5 > "$OUT/bench_train_vitl14.log" 2>&1
tail -n 1 "$OUT/bench_train_vitl14.log"
