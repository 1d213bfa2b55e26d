if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
# Few-step families and real-size guidance on one GPU, at most 8 minutes in all (TOTAL=470 s).
# Random weights from the real configs (doodl_lightning/testing/architectures.py, flow_models.py, and for SANA,
# FLUX.2 and Qwen-Image family_models.py over sana_models.py / flux2_models.py / qwen_image_models.py; the guidance
# models at their released sizes, see iterations.py), bf16 frozen models, float32 latents. In priority order, the
# most-asked first (a record that no longer fits is skipped, not started):
#   1  iterations.py sd-turbo 512, 1 step, 50 iterations, CLIP ViT-L-14          -> issue 16: <= 5 s, peak <= 8 GiB
#   2  backprop.py FLUX.1-schnell 1024 at 1 and 4 steps, flow, --floor             -> issue 18: 1 step <= 1.3x floor, <= 60 GiB
#   3  backprop.py SD3.5-medium 1024, 28 steps, CFG 7, flow, --floor               -> issue 18: <= 1.25x floor
#   4  backprop.py SANA-Sprint 1.6B 1024 at 1 and 2 steps, scm, --floor            -> issue 28: iteration vs floor, peak
#   5  backprop.py FLUX.2 klein 4B 1024, 4 steps, flow, --floor                    -> issue 28: iteration vs floor, peak
#   6  backprop.py SANA 1600M 1024, 20 steps, CFG 4.5, flow_dpm, --floor           -> issue 28: iteration vs floor, peak
#   7  backprop.py Qwen-Image 20B 1024, 4 of its 30 steps, CFG 4, flow, --floor    -> issue 28: iteration vs floor, peak
#      (weights made in bf16, --build-in-dtype: 41 GB, float32 would be 82; transformer gradient checkpointing; the
#      checkpoint chain's peak is flat in steps and its time linear, so 30 steps ~ 7.5x the 4-step iteration, which
#      alone would take minutes here; no VAE checkpointing: AutoencoderKLQwenImage and SANA's AutoencoderDC have none)
#   8  iterations.py sd-turbo 512, 1 step, 50 iterations, the 4-reward ensemble   -> issue 17: <= 8 s/image, <= 12 GiB
#   9  backprop.py SDXL 1024, 50 DDIM steps, checkpoint, --floor, VAE checkpointing -> issue 16: <= 1.25x floor, <= 16 GiB
#  10  iterations.py record 1 with VAE-decoder checkpointing (what it saves of the peak)
#  11  backprop.py SDXL-Turbo 512 at 1 and 4 steps, --floor
#  12  backprop.py SD-Turbo 512 + ControlNet, 1 step, --floor
#  13  iterations.py record 1 with the UNet as CUDA graphs (what they buy)
#  14  iterations.py record 1 with 4 images at once (throughput)
# Rows 1-7 at their hard limits already exceed the budget: the rows after them run when the earlier ones end early
# (each is skipped when less than its minimum is left, so a later, smaller row may still run).
# Run from the repository root on the device machine, the wheels the image lacks carried in .whl/ (diffusers,
# open_clip_torch, ftfy, wcwidth):
#   bash experiments/benchmarks/gpu_families.sh     (writes $OUT/families.json, bp_*.json, families.log, gpu.txt)
# Every record runs in its own process under a hard timeout and an internal deadline (iterations.py stops
# iterating and writes a 'partial' record), is caught on its own (OOM / error -> its status), and its JSON is
# (re)written when it ends (iterations.py: a 'started' record first, replaced by the result). Summary last.
# CPU check of this script's logic (not a measurement):
#   PY=.venv/bin/python ITER_ARGS="--tiny --device cpu --dtype float32" \
#   BP_ARGS="--device cpu --sd-config tiny-sdxl --resolution 32 --dtype float32" \
#   FLOW_ARGS="--device cpu --tiny --resolution 32 --dtype float32" OUT=/tmp/famcheck bash ...
# (--tiny: every flow row runs its model's tiny counterpart, tiny-flux-schnell, tiny-sd3, tiny-sana-sprint,
# tiny-flux2-klein, tiny-sana, tiny-qwen-image: the same backbone classes and samplers at toy size)
set -u
OUT=${OUT:-/tmp/doodl-bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$SECONDS
TOTAL=${TOTAL:-470}
PY=${PY:-python3}
ITER=experiments/benchmarks/iterations.py
BP=experiments/benchmarks/backprop.py
ITER_ARGS=${ITER_ARGS:-}
BP_ARGS=${BP_ARGS:-}
FLOW_ARGS=${FLOW_ARGS:-}   # the flow-model rows' overrides (the CPU check: --tiny, each row's tiny model)
WEIGHTS=${WEIGHTS:-/tmp/doodl-rand-weights}   # the reward models' random files (reused by a rerun on this machine)
LOG="$OUT/families.log"
JSON="$OUT/families.json"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
$PY -c "import open_clip, ftfy; print('open_clip', open_clip.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
echo "# gpu_families.sh started $(date -u '+%F %T') UTC, TOTAL=${TOTAL}s" > "$LOG"

# run NAME LIMIT MIN COMMAND...: COMMAND under a hard timeout of min(LIMIT, time left), @DEADLINE@ in it replaced
# by that limit less 20 s (iterations.py's internal deadline: time to finish and write the record); skipped when
# less than MIN seconds are left. The output is appended to families.log; its last lines are shown.
run() {
  local name=$1 limit=$2 min=$3
  shift 3
  local left=$((TOTAL - 20 - (SECONDS - T0)))
  if [ "$left" -lt "$min" ]; then
    echo "== $name: skipped (${left}s left, needs ${min}s)" | tee -a "$LOG"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local args=() a
  for a in "$@"; do args+=("${a//@DEADLINE@/$((limit - 20))}"); done
  echo "== $name (hard limit ${limit}s; $((SECONDS - T0))s elapsed): ${args[*]}" | tee -a "$LOG"
  local start=$SECONDS
  timeout -k 10 "$limit" "${args[@]}" > /tmp/doodl-record.log 2>&1
  local rc=$?
  cat /tmp/doodl-record.log >> "$LOG"
  tail -n 5 /tmp/doodl-record.log
  echo "== $name: exit $rc after $((SECONDS - start))s (124 = hard timeout)" | tee -a "$LOG"
}

ITER_RUN="$PY $ITER --device cuda --dtype bfloat16 --weights-dir $WEIGHTS --json $JSON --append --no-progress --deadline @DEADLINE@"
BP_RUN="$PY $BP --device cuda --dtype bfloat16 --samplers ddim --backprops checkpoint --floor --grad-reference none"
TURBO="--sd-config sd-turbo --resolution 512 --steps 1 --iterations 50"

FLOW_RUN="$PY $BP --device cuda --dtype bfloat16 --samplers flow --backprops checkpoint --floor --grad-reference none"

run issue16_clip_vit_l 100 45 $ITER_RUN $TURBO --guidance clip-vit-l $ITER_ARGS
run flux_schnell_1024_floor 130 70 $FLOW_RUN --sd-config flux-schnell --resolution 1024 --steps 1 4 --vae-checkpointing \
  --repeats 2 --warmup 1 --record-budget 30 --json "$OUT/bp_flux_schnell.json" $FLOW_ARGS
run sd35_medium_1024_floor 120 70 $FLOW_RUN --sd-config sd35-medium --resolution 1024 --steps 28 --guidance-scale 7.0 \
  --vae-checkpointing --repeats 1 --warmup 1 --record-budget 40 --json "$OUT/bp_sd35_medium.json" $FLOW_ARGS
run sana_sprint_1024_floor 60 35 $FLOW_RUN --sd-config sana-sprint --samplers scm --resolution 1024 --steps 1 2 \
  --guidance-scale 4.5 --repeats 3 --warmup 1 --record-budget 10 --json "$OUT/bp_sana_sprint.json" $FLOW_ARGS
run flux2_klein_1024_floor 80 45 $FLOW_RUN --sd-config flux2-klein --resolution 1024 --steps 4 --guidance-scale 1.0 \
  --vae-checkpointing --repeats 2 --warmup 1 --record-budget 20 --json "$OUT/bp_flux2_klein.json" $FLOW_ARGS
run sana_1600m_1024_floor 75 45 $FLOW_RUN --sd-config sana-1600m --samplers flow_dpm --resolution 1024 --steps 20 \
  --guidance-scale 4.5 --repeats 2 --warmup 1 --record-budget 20 --json "$OUT/bp_sana_1600m.json" $FLOW_ARGS
run qwen_image_1024_floor 170 120 $FLOW_RUN --sd-config qwen-image --resolution 1024 --steps 4 --guidance-scale 4.0 \
  --build-in-dtype --transformer-checkpointing --repeats 1 --warmup 1 --json "$OUT/bp_qwen_image.json" $FLOW_ARGS
run issue17_reward_ensemble 200 90 $ITER_RUN $TURBO --guidance reward-ensemble --vae-checkpointing $ITER_ARGS
run issue16_sdxl_1024_floor 150 80 $BP_RUN --sd-config sdxl --resolution 1024 --steps 50 --vae-checkpointing \
  --repeats 2 --warmup 1 --record-budget 45 --json "$OUT/bp_sdxl.json" $BP_ARGS
run issue16_clip_vit_l_vaeckpt 70 40 $ITER_RUN $TURBO --guidance clip-vit-l --vae-checkpointing $ITER_ARGS
run sdxl_turbo_512_floor 80 40 $BP_RUN --sd-config sdxl-turbo --resolution 512 --steps 1 4 --vae-checkpointing \
  --guidance-scale 1.0 --repeats 3 --json "$OUT/bp_sdxl_turbo.json" $BP_ARGS
run sd_turbo_controlnet_floor 70 40 $BP_RUN --sd-config sd-turbo --resolution 512 --steps 1 --controlnet \
  --guidance-scale 1.0 --repeats 3 --json "$OUT/bp_controlnet.json" $BP_ARGS
run issue16_clip_vit_l_graphs 70 40 $ITER_RUN $TURBO --guidance clip-vit-l --cuda-graphs $ITER_ARGS
run clip_vit_l_batch4 70 40 $ITER_RUN $TURBO --guidance clip-vit-l --batch 4 $ITER_ARGS

echo "== summary ($(head -1 "$OUT/gpu.txt"); $((SECONDS - T0)) s) ==" | tee -a "$LOG"
$PY $ITER --summarize "$JSON" "$OUT"/bp_*.json 2>&1 | tee -a "$LOG"
