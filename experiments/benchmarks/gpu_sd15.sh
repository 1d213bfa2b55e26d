python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
# SD-1.5-size benchmark of the chain-gradient modes on one GPU, about 6 minutes in all.
# Random weights from the real SD-1.5 configs (doodl_lightning/testing/architectures.py), 512x512, CFG 7.5 batched,
# horizontal-symmetry loss on the decoded image, fp16 (+ bf16 and an fp32 reference for gradient errors).
# Run from the repository root on the device machine with the diffusers wheels carried in .whl/:
#   bash experiments/benchmarks/gpu_sd15.sh            (writes $OUT/sd15.json, sd15_compile.json, *.log)
# Every record is caught on its own (OOM / error -> status), JSON is rewritten after each record, the main
# run has an internal deadline and a hard timeout, and the summary table is printed last.
set -u
OUT=${OUT:-/tmp/doodl-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$SECONDS
TOTAL=${TOTAL:-350}          # seconds for the whole script
MAIN_DEADLINE=${MAIN_DEADLINE:-255}
BENCH=experiments/benchmarks/backprop.py
PY=${PY:-python3}            # CPU check of this script's logic (not a measurement):
BENCH_ARGS=${BENCH_ARGS:-}   #   PY=.venv/bin/python BENCH_ARGS="--device cpu --sd-config tiny" TOTAL=200 bash ...

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

# Priority order (a record that would run past the deadline is skipped, not started):
#  1-3  CUDA graphs, batch 1, 50 / 10 / 100 steps        -> the <= 2.5 s / <= 6 s targets and the flat memory
#  4    CUDA graphs, batch 4, 50 steps                    -> throughput vs the official code
#  5    eager, batch 1, 10 steps (+ autograd, + VAE decoder without checkpointing) -> what graphs / VAE ckpt buy
#  6    channels_last (graphs, DDIM 50 steps)
#  7    bf16 at 10 steps; then the fp32 references (10 steps) for every low-precision gradient
PLAN='[
 {"accel": "graphs", "steps": [50], "samplers": ["ddim", "edict"], "backprops": ["checkpoint", "reversible"]},
 {"accel": "graphs", "steps": [10], "samplers": ["ddim", "edict"], "backprops": ["checkpoint", "reversible"]},
 {"accel": "graphs", "steps": [100], "samplers": ["ddim", "edict"], "backprops": ["checkpoint", "reversible"], "repeats": 1},
 {"accel": "graphs", "steps": [50], "batch": [4], "samplers": ["ddim", "edict"], "backprops": ["checkpoint", "reversible"], "repeats": 2},
 {"accel": "eager", "steps": [10], "samplers": ["ddim", "edict"], "backprops": ["autograd", "checkpoint", "reversible"]},
 {"accel": "eager", "steps": [10], "samplers": ["ddim"], "backprops": ["checkpoint"], "vae_checkpointing": false, "repeats": 1},
 {"accel": "graphs", "steps": [50], "samplers": ["ddim"], "backprops": ["checkpoint"], "channels_last": true},
 {"accel": "eager", "steps": [10], "dtype": "bfloat16", "samplers": ["ddim", "edict"], "backprops": ["checkpoint", "reversible"], "repeats": 1, "warmup": 0}
]'
# --drift-tolerance 1: time the reversible sweep itself (its drift is reported; the library default 1e-3
# would fall back to checkpoint, i.e. add a checkpoint backward, whose cost is measured separately).
timeout -k 10 $((TOTAL - 60 - (SECONDS - T0))) $PY $BENCH --sd-config sd15 --device cuda --dtype float16 \
  --vae-checkpointing --drift-tolerance 1 --max-autograd-steps 10 --grad-reference float32 --reference-max-steps 10 \
  --record-budget 30 --deadline $MAIN_DEADLINE --plan "$PLAN" --json "$OUT/sd15.json" $BENCH_ARGS 2>&1 | tee "$OUT/sd15.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || echo "main run ended with status $rc (124 = hard timeout; records so far are in sd15.json)"

# torch.compile of the UNet (default mode) on one record, with whatever time is left (compile time counts).
LEFT=$((TOTAL - 15 - (SECONDS - T0)))
if [ "$LEFT" -gt 45 ]; then
  timeout -k 10 $LEFT $PY $BENCH --sd-config sd15 --device cuda --dtype float16 --vae-checkpointing --compile \
    --steps 10 --samplers ddim --backprops checkpoint --grad-reference none --json "$OUT/sd15_compile.json" \
    $BENCH_ARGS > "$OUT/sd15_compile.log" 2>&1
  rc=$?
  tail -n 8 "$OUT/sd15_compile.log"
  [ $rc = 0 ] || echo "compile run ended with status $rc after at most ${LEFT}s (124 = did not finish in time)"
else
  echo "no time left for the torch.compile record"
fi

echo "== summary ($(cat "$OUT/gpu.txt" | head -1); $((SECONDS - T0)) s) =="
$PY $BENCH --summarize "$OUT/sd15.json" "$OUT/sd15_compile.json"
