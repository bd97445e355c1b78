#!/usr/bin/env bash
# One GPU session in one call (issue 17): the `gpu` tests, then the full DINOv2 step benchmark
# matrix on one device with the vitl14/vitg14 recipes (layout auto: no FSDP2, no activation
# checkpointing when the step fits), eager vs torch.compile per block, token packing, a profile
# summary, the same-run timm baseline, and a ViT-g batch sweep. Every run has its own timeout;
# the whole matrix stays under GPU_BENCH_SECONDS (default 420 s) of wall time.
#
# Results go to ${OUT:-gpu-results} as seven files: device.txt, tests.log, bench.log (all
# output), clip.json (tools/bench_clip.py's JSON), results.jsonl (one bench_train JSON per line,
# profile included), profiles.txt, and
# summary.md (tools/gpu_bench_report.py: the tables for benchmarks/results/).
#
# On the lent device machine: carry .whl (omegaconf, simplejpeg, webdataset, braceexpand,
# open_clip_torch, ftfy, wcwidth wheels for its Python 3.12; torch, timm, transformers, numpy,
# pyyaml are there) and run `bash tools/gpu_bench.sh`. .whl/ is not tracked; fill it with
#   .venv/bin/pip download --no-deps --python-version 3.12 --only-binary=:all: \
#     --platform manylinux2014_x86_64 -d .whl omegaconf==2.4.0 simplejpeg==1.9.0 \
#     webdataset==1.0.2 braceexpand==0.1.7 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 clip.json holds the CLIP step next to
# open_clip's (issue 14's GPU target).
# Rehearsal on a CPU: GPU_BENCH_TINY=1 bash tools/gpu_bench.sh (vit_tiny sizes, same steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_bench.XXXXXX)
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor  # shared by the runs: same-shape graphs reuse
START=$SECONDS
BUDGET=${GPU_BENCH_SECONDS:-420}
TINY=${GPU_BENCH_TINY:-0}
LOG=$OUT/bench.log

{ date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || echo "commit: unknown";
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
    || echo "no nvidia-smi";
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"; } \
  > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

left() { echo $((BUDGET - (SECONDS - START))); }

# bench NAME SECONDS ARGS...: one bench_train run, its JSON appended to results.jsonl
bench() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "## $name: skipped, ${remaining}s left of the ${BUDGET}s budget" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "## $name (limit ${limit}s): bench_train.py $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" $PY tools/bench_train.py "$@" \
    --out "$WORK/$name.json" >> "$LOG" 2>&1
  local rc=$?
  if [ -f "$WORK/$name.json" ]; then
    $PY - "$WORK/$name.json" "$name" "$rc" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
r["run"], r["rc"] = sys.argv[2], int(sys.argv[3])
print(json.dumps(r, sort_keys=True))
EOF
    $PY - "$WORK/$name.json" "$name" <<'EOF' | tee -a "$LOG"
import json, sys
r = json.load(open(sys.argv[1]))
t = r.get("timm") or {}
mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
print(f"=> {sys.argv[2]}: {r['arch']} bs {r['batch_per_device']} compile {r['compile']} "
      f"pack {r['pack']} ac {r['act_ckpt']} fsdp {r['fsdp']}: {r['step_ms_median']} ms, "
      f"{r['images_per_s']} img/s, MFU {mfu}, {r['peak_mem_gib']} GiB"
      + (f", timm {t.get('images_per_s')} img/s, x{r.get('speedup_vs_timm_backbone')}"
         if t.get("status") == "ok" else ""))
EOF
    if [ -f "$WORK/$name.profile.txt" ]; then
      { echo "## $name"; cat "$WORK/$name.profile.txt"; echo; } >> "$OUT/profiles.txt"
    fi
  else
    echo "=> $name: no result (rc $rc, $((SECONDS - t0))s; see bench.log)" | tee -a "$LOG"
    echo "{\"run\": \"$name\", \"rc\": $rc, \"status\": \"no result\"}" >> "$OUT/results.jsonl"
  fi
}

# 1. the gpu tests (host syncs under sync debug mode, bench_train on the GPU, losses, xformers)
timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/train/test_host_syncs.py \
  tests/distributed/test_bench_train.py tests/losses/test_losses_gpu.py \
  tests/models/test_backends_and_training.py > "$OUT/tests.log" 2>&1
echo "gpu tests: rc $? ($(tail -n 1 "$OUT/tests.log"))" | tee -a "$LOG"

# clip_bench SECONDS ARGS...: our CLIP training step next to open_clip's, same towers and batch
clip_bench() {
  local limit=$1; shift
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 20 ]; then
    echo "## clip: skipped, ${remaining}s left of the ${BUDGET}s budget" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  echo "## clip (limit ${limit}s): bench_clip.py $*" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" $PY tools/bench_clip.py "$@" \
    > "$WORK/clip.out" 2>> "$LOG"
  echo "=> clip: rc $? $(tail -n 1 "$WORK/clip.out")" | tee -a "$LOG"
  tail -n 1 "$WORK/clip.out" > "$OUT/clip.json"
}

if [ "$TINY" = 1 ]; then
  T=(--config mnist_tiny_cpu heads.n_prototypes=256 heads.hidden_dim=128
     heads.bottleneck_dim=64 crops.n_local=2 model.drop_path_rate=0.4 --warmup 1 --steps 2)
  bench tiny_eager 120 "${T[@]}" --batch-size 4 --pack --profile 1 --timm-baseline
  bench tiny_compile 240 "${T[@]}" --batch-size 4 --pack --compile
  bench tiny_bs8 120 "${T[@]}" --batch-size 8 --pack
  clip_bench 120 --size tiny --batch 8 --rounds 1 --steps 1 --warmup 1
else
  R=(--dtype bf16 --warmup 3 --steps 6)
  # 2. ViT-g/14 recipe, eager + packing: the honest MFU, where the time goes, timm alongside
  bench g12_eager 100 --config vitg14 "${R[@]}" --batch-size 12 --pack --profile 2 --timm-baseline
  # 3. the same with torch.compile per block
  bench g12_compile 170 --config vitg14 "${R[@]}" --batch-size 12 --pack --compile --profile 2
  # 4. ViT-L/14 recipe, compiled + packed, timm alongside
  bench l32_compile 130 --config vitl14 "${R[@]}" --batch-size 32 --pack --compile --timm-baseline
  # 5. packing's share: the first run without it
  bench g12_eager_nopack 60 --config vitg14 "${R[@]}" --batch-size 12
  # 6. CLIP: ViT-B/16 image tower + 12-layer text tower, ours vs open_clip (issue 14: >= 1.3x)
  clip_bench 90 --size b16 --dtype bf16 --batch 256
  # 7. ViT-g batch sweep (eager, packed) as time allows
  for bs in 24 48 32; do
    bench g${bs}_eager 60 --config vitg14 "${R[@]}" --batch-size $bs --pack
  done
fi
echo "total ${SECONDS}s (budget ${BUDGET}s)" | tee -a "$LOG"
$PY tools/gpu_bench_report.py "$OUT" > "$OUT/summary.md" 2>> "$LOG"
grep -h "^=> \|^gpu tests" "$LOG"
