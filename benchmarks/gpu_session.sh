#!/usr/bin/env bash
# The GPU measurements still open for the kernel, training and generation issues, as device
# calls of under 10 minutes each. Every step has its own time limit and writes its JSON under
# $OUT as soon as it has a row, so a step that runs long loses only itself.
#
# Next session's plan (about 25 min of device time):
#   OUT=$OUT bash benchmarks/gpu_session.sh x4-full   # nvidia-h100-x4, about 9 min
#   OUT=$OUT bash benchmarks/gpu_session.sh x4-mixed  # same host, about 9 min
#   OUT=$OUT bash benchmarks/gpu_session.sh scaling   # same host, about 4 min
#
# x4-full: one training configuration per GPU side by side (the 1.6B step at B4 T4096): fla
#     (its cold compile has needed over 240 s), ours full tuning with per-block remat, ours
#     full tuning keeping the matmul outputs (remat "dots"), ours state tuning.
# x4-mixed: the kernel step on GPU 0, state-tuning scaling over 1 then 2 GPUs on GPUs 1-2,
#     the generate step (without command buffers) on GPU 3.
# scaling: the host alone, state tuning on 1, 2 and 4 GPUs.
# scaling-full: scaling with a shorter limit, then x4-full without fla (one 10-min call).
# Single-GPU steps (nvidia-h100-x1):
# kernel: the GPU kernel tests (the "factored" intra-chunk mode, poisoned outputs), then
#     bench_wkv on the issue's three shapes against fla (fla first; "factored" at chunks of 16
#     and 32; "loop").
# train: the 1.6B training step: fla first, then ours full (block remat, dots) and state.
# generate: the generation issue's figures (ours and the official package, same run).
set -u
OUT=${OUT:?set OUT to a folder for the results}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

kernel() {
  JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
    -k "factored or poison" 2>&1 | tail -15
  timeout 330 python3 benchmarks/bench_wkv.py --shapes all --reps 10 --profile \
    --configs 16:4:1:factored,32:4:1:factored,16:4:1:loop --out "$OUT/wkv_vs_fla.json" \
    2>&1 | grep -v -i warn
}

generate() {
  timeout 300 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
    --official on --repeats 3 --out "$OUT/generate_h100.json" 2>&1 | grep -v -i warn
}

case ${1:-} in
  kernel) kernel ;;
  generate) generate ;;
  train)
    timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 --timeout 240 \
      --configs fla,ours_full_remat,ours_full_dots,ours_state --out "$OUT/train_1p6b.json" \
      2>&1 | grep -v -i warn | grep -v '^ '
    ;;
  x4-full)
    gpu=0
    for config in fla ours_full_remat ours_full_dots ours_state; do
      CUDA_VISIBLE_DEVICES=$gpu timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 \
        --first-gpu $gpu --timeout 540 --configs $config \
        --out "$OUT/train_$config.json" >"$OUT/train_$config.log" 2>&1 &
      gpu=$((gpu + 1))
    done
    wait
    grep -h -v -i warn "$OUT"/train_*.log | grep GPU
    ;;
  x4-mixed)
    (export CUDA_VISIBLE_DEVICES=0; kernel) >"$OUT/kernel.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 \
      --first-gpu 1 --gpus 1,2 --timeout 280 --configs ours_state \
      --out "$OUT/train_scaling.json" >"$OUT/scaling.log" 2>&1 &
    (export CUDA_VISIBLE_DEVICES=3; generate) >"$OUT/generate.log" 2>&1 &
    wait
    for log in kernel scaling generate; do
      echo "== $log"; grep -v -i warn "$OUT/$log.log" | grep -v '^ ' | tail -25
    done
    ;;
  scaling-full)
    # The host alone for the scaling rows, then ours (no fla: its cold compile alone needs
    # over 4 minutes) full tuning both remat ways and state tuning side by side.
    timeout 300 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 1,2,4 --timeout 95 \
      --configs ours_state --out "$OUT/train_scaling.json" 2>&1 | grep GPU
    gpu=0
    for config in ours_full_remat ours_full_dots ours_state; do
      CUDA_VISIBLE_DEVICES=$gpu timeout 270 python3 benchmarks/bench_train_gpu.py --steps 3 \
        --first-gpu $gpu --timeout 260 --configs $config \
        --out "$OUT/train_$config.json" >"$OUT/train_$config.log" 2>&1 &
      gpu=$((gpu + 1))
    done
    wait
    grep -h -v -i warn "$OUT"/train_*.log | grep GPU
    ;;
  scaling)
    timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 1,2,4 --timeout 170 \
      --configs ours_state --out "$OUT/train_scaling.json" 2>&1 | grep GPU
    ;;
  *)
    echo "usage: OUT=DIR bash benchmarks/gpu_session.sh kernel|generate|train|x4-full|x4-mixed|scaling|scaling-full" >&2
    exit 2
    ;;
esac
