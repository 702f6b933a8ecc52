#!/usr/bin/env bash
# The prepared GPU check of the 7B path (docs/benchmarks.md, "GPU check"): one H100/H200, no hub,
# under 8 minutes. On a random-weight model of zephyr-7b's widths (hidden 4096, d_ff 14336,
# bf16, built on the device; KUDA_CHECK_LAYERS layers, 8 by default, 32 for the whole model):
#   1. kuda unlearn with KUDA (causal tracing on short probes, null-space projector), RMU and GA
#      (every parameter, float32 master weights), a few steps each, checkpoints, CUDA throughout;
#   2. kuda eval of KUDA's checkpoint with lm-eval on a local WMDP-format file;
#   3. scripts/bench_unlearn.py at the real 32-layer shape: KUDA's peak memory / bf16 weights,
#      step time against full fine-tuning, eigh time at d_ff 14336;
#   4. a summary: each run's peak memory / bf16 weights, the projector's leak in bf16.
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
#   KUDA_CHECK_DEVICE=cpu KUDA_CHECK_SHAPE=tiny KUDA_CHECK_DTYPE=float32 KUDA_CHECK_LAYERS=4 \
#     bash scripts/gpu_check.sh        # the script itself on a CPU (tests/test_gpu_check.py)
#
# Exit status 1 when a step fails (the remaining steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
KUDA=${KUDA:-.venv/bin/kuda}
DEVICE=${KUDA_CHECK_DEVICE:-cuda}
SHAPE=${KUDA_CHECK_SHAPE:-zephyr-7b}
LAYERS=${KUDA_CHECK_LAYERS:-8}
STEPS=${KUDA_CHECK_STEPS:-4}
DTYPE=${KUDA_CHECK_DTYPE:-bfloat16}  # the CPU self-check uses float32: bf16 matmuls are slow there
WORK=${KUDA_CHECK_DIR:-$(mktemp -d /tmp/kuda-gpu-check.XXXXXX)}
export KUDA_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
run() { "$@" || { echo "!! failed ($?): $*"; status=1; }; }
started=$(date +%s)

step "environment"
date -u +%Y-%m-%d
run "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"

step "build: $SHAPE widths, $LAYERS layers, bf16, on $DEVICE"
run "$PY" scripts/gpu_check.py build "$WORK" --shape "$SHAPE" --layers "$LAYERS" --device "$DEVICE"

COMMON=(
  model=local "model.path=$WORK/model" "model.dtype=$DTYPE" "model.device=$DEVICE"
  data=wmdp_bio "data.forget.path=$WORK/forget.jsonl" "data.retain.path=$WORK/retain.jsonl"
  "data.questions.path=$WORK/wmdp_bio.jsonl"
  eval=none "unlearn.precision=$([ "$DTYPE" = bfloat16 ] && echo bfloat16 || echo float32)"
  "unlearn.steps=$STEPS" unlearn.save_every=2
  unlearn.batch_size=2 unlearn.max_length=128
)
last=$((LAYERS - 1))
steer=$((LAYERS > 4 ? 3 : last))
fixed="[$((steer > 1 ? steer - 2 : 0)),$((steer > 0 ? steer - 1 : 0)),$steer]"

step "kuda unlearn: KUDA (trace on short probes, projector, checkpoint)"
run "$KUDA" unlearn "${COMMON[@]}" unlearn=kuda locate=causal_tracing locate.max_probes=4 \
  locate.samples=2 locate.max_tokens=32 unlearn.nullspace.samples=64 "hydra.run.dir=$WORK/runs/kuda"

step "kuda unlearn: RMU (layers $fixed)"
run "$KUDA" unlearn "${COMMON[@]}" unlearn=rmu_zephyr locate=fixed "locate.layers=$fixed" \
  "unlearn.layers=$fixed" "unlearn.steer_layer=$steer" "hydra.run.dir=$WORK/runs/rmu"

step "kuda unlearn: GA (every parameter, float32 master weights)"
run "$KUDA" unlearn "${COMMON[@]}" unlearn=ga 'unlearn.trainable=[all]' locate=fixed \
  "locate.layers=$fixed" unlearn.lr=1e-5 "hydra.run.dir=$WORK/runs/ga"

step "kuda eval: KUDA's checkpoint, lm-eval on the local WMDP-format file"
run "$KUDA" eval model=local "model.path=$WORK/runs/kuda/checkpoint" "model.dtype=$DTYPE" \
  "model.device=$DEVICE" data=wmdp_bio eval=wmdp 'eval.metrics=[lm_eval]' \
  'eval.wmdp.tasks=[wmdp_bio]' "eval.wmdp.bio_path=$WORK/wmdp_bio.jsonl" "hydra.run.dir=$WORK/runs/eval"

step "bench_unlearn: the real shape ($SHAPE), KUDA against full fine-tuning, eigh"
if [ "$SHAPE" = tiny ]; then bench=(--shape tiny); else bench=(--shape "$SHAPE" --eigh-sizes 14336); fi
run "$PY" scripts/bench_unlearn.py "${bench[@]}" --device "$DEVICE" --variants kuda,full_ft \
  --warmup 1 --steps 3

step "summary"
run "$PY" scripts/gpu_check.py summary "$WORK"
echo "total $(( $(date +%s) - started )) s; work directory $WORK; exit $status"
exit $status
