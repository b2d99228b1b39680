#!/usr/bin/env bash
# Issue 6's GPU path, checked and measured in one call of a lent GPU machine (README "Performance").
#
#   OUT=/tmp/gpu BUDGET_S=560 bash benchmarks/gpu.sh
#
# Optional: FMNIST_DIR, a folder with Fashion-MNIST's four idx .gz files (that machine has no Debian
# package), for the small-model training runs; BEFORE_SRC, another checkout's src/ to run those
# runs with as well, so a change is measured against the code before it in the same call;
# ONLY=small, those runs alone (with the EMA benchmark).
#
# Runs from the repository root with the machine's own python3 (torch, timm, safetensors, einops,
# scikit-learn there); vitkit comes from src/. Steps run in order of importance, each under its own
# time limit and all under BUDGET_S seconds, so one that hangs costs only itself and the log comes
# back whole. Everything is appended to $OUT/gpu.log; the bench tables also go to $OUT/*.json.
set -u
OUT=${OUT:-/tmp/vitkit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=$((SECONDS + ${BUDGET_S:-560}))
exec > >(tee -a "$OUT/gpu.log") 2>&1

step() {  # step LIMIT_S CMD...: run CMD under min(LIMIT_S, time left); skip it when under 20 s are left
    local limit=$1 left=$((DEADLINE - SECONDS)) t0=$SECONDS
    shift
    ((left < limit)) && limit=$left
    echo
    if ((limit < 20)); then echo "=== SKIPPED (budget spent): $*"; return; fi
    echo "=== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== rc=$? in $((SECONDS - t0))s"
}
bench() {  # bench LIMIT_S NAME FLAGS...
    local limit=$1 name=$2
    shift 2
    step "$limit" "$PY" -m vitkit bench --device cuda --runs 20 --warmup 3 --json "$OUT/$name.json" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"

# 1. correctness on the device: parity with timm (every architecture feature), flash attention, where
#    the step's time goes
[[ "${ONLY:-}" != small ]] && step 100 "$PY" benchmarks/gpu_checks.py --batch-size 64

# 2. a small model's training on the GPU, where kernel launches are the step: Fashion-MNIST's recipe
#    for 2 epochs eager (and with BEFORE_SRC's code), compiled, and compiled with CUDA graphs; eager
#    and with CUDA graphs again with a host read every step (--log-every 1) instead of every 32
RUNS=$(mktemp -d)
if [[ -n "${FMNIST_DIR:-}" ]]; then
    FM=(-m vitkit train --config configs/fashion_mnist.yaml --data-dir "$FMNIST_DIR" --epochs 2 --device cuda --progress off)
    [[ -n "${BEFORE_SRC:-}" ]] && step 60 env PYTHONPATH="$BEFORE_SRC" "$PY" "${FM[@]}" --out "$RUNS/fm-before"
    step 60 "$PY" "${FM[@]}" --out "$RUNS/fm-eager"
    step 60 "$PY" "${FM[@]}" --log-every 1 --out "$RUNS/fm-eager-read-every-step"
    step 120 "$PY" "${FM[@]}" --compile true --compile-mode reduce-overhead --out "$RUNS/fm-cudagraphs"
    step 120 "$PY" "${FM[@]}" --compile true --compile-mode reduce-overhead --log-every 1 \
        --out "$RUNS/fm-cudagraphs-read-every-step"
    step 120 "$PY" "${FM[@]}" --compile true --out "$RUNS/fm-compiled"
fi
step 45 "$PY" benchmarks/ema.py --device cuda
[[ "${ONLY:-}" == small ]] && exit 0

# 3. the training CLI on CUDA: a run interrupted after epoch 3 and resumed, against one straight run,
#    then eval; torchrun with NCCL (DDP and FSDP, one process: the machine has one GPU)
TRAIN=(-m vitkit train --config configs/digits.yaml --epochs 6 --warmup-epochs 1 --precision bf16 --device cuda --progress off)
step 60 "$PY" "${TRAIN[@]}" --out "$RUNS/straight"
step 60 "$PY" "${TRAIN[@]}" --out "$RUNS/resumed" --stop-after-epoch 3
step 60 "$PY" -m vitkit train --resume "$RUNS/resumed" --progress off
for r in straight resumed; do echo "-- $r/metrics.csv"; cat "$RUNS/$r/metrics.csv"; done
step 45 "$PY" -m vitkit eval "$RUNS/resumed" --device cuda --precision bf16
# fp16 with loss scaling (the precision of GPUs without bf16), the same run: its losses beside bf16's
step 60 "$PY" "${TRAIN[@]}" --precision fp16 --out "$RUNS/fp16"
cat "$RUNS/fp16/metrics.csv"
# knowledge distillation from the straight run (the teacher scores each augmented batch on the device)
step 60 "$PY" "${TRAIN[@]}" --epochs 2 --teacher "$RUNS/straight" --out "$RUNS/distilled"
cat "$RUNS/distilled/metrics.csv"
for strategy in ddp fsdp; do
    step 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 "${TRAIN[@]}" --epochs 2 \
        --strategy "$strategy" --ema false --out "$RUNS/torchrun-$strategy"
    cat "$RUNS/torchrun-$strategy/metrics.csv"
done

# 4. eager speed (fast to run), the naive math-attention baseline included
bench 90 infer_bf16_eager --mode infer --precision bf16 --batch-size 256 --contestants vitkit,timm,vitkit-math
bench 90 train_autocast_eager --mode train --precision bf16-autocast --batch-size 128 --contestants vitkit,timm,vitkit-math

# 5. fp32 (TF32 off, as torch's default) and compiled speed
bench 60 infer_fp32_eager --mode infer --precision fp32 --batch-size 256 --contestants vitkit,timm
bench 150 infer_bf16_compiled --mode infer --precision bf16 --compile --batch-size 256 --contestants vitkit,timm
bench 200 train_autocast_compiled --mode train --precision bf16-autocast --compile --batch-size 128 --contestants vitkit,timm

# 6. the other families' shapes (eager): SigLIP so400m (head width 72, attention pooling), DINOv2
#    giant (SwiGLU, 1,370 tokens at 518), DeiT's distillation token
bench 70 siglip_infer --model vit_so400m_patch14_siglip_224 --mode infer --precision bf16 --batch-size 128 --contestants vitkit,timm
bench 70 siglip_train --model vit_so400m_patch14_siglip_224 --mode train --precision bf16-autocast --batch-size 64 --contestants vitkit,timm
bench 70 giant_infer --model vit_giant_patch14_dinov2 --mode infer --precision bf16 --batch-size 16 --contestants vitkit,timm
bench 70 deit_train --model deit_base_distilled_patch16_224 --mode train --precision bf16-autocast --batch-size 128 --contestants vitkit,timm
echo "=== done in ${SECONDS}s"
