#!/usr/bin/env bash
# The GPU measurements still open for the kernel and training issue, as two device calls on a
# single H100 (each under the 10-minute limit of one call). Every step has its own time limit
# and writes its JSON under $OUT as soon as it has a row, so a step that runs long loses only
# itself.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh kernel   # about 7 min
#   OUT=/tmp/out bash benchmarks/gpu_session.sh train    # about 9 min
#   OUT=/tmp/out bash benchmarks/gpu_session.sh generate # about 8 min
#
# kernel: the GPU kernel tests (the "factored" intra-chunk mode, poisoned outputs), then
#         bench_wkv on the issue's three shapes against fla (fla first; "factored" at chunks
#         of 16 and 32; "loop").
# train:  the 1.6B training step: fla first (the peer; a cold machine needed over 150 s for
#         it), then ours full, state, and full in 2 micro-batches.
# generate: the generation issue's figures (ours and the official package, same run), then
#         ours again with XLA command buffers (CUDA graphs) over the decode loop's while body:
#         an untested idea for decoding at batch 1, which runs many small kernels a token.
# x4: on a 4-GPU host, three benchmarks side by side within one call (about 9.5 min): the
#     training step (fla, ours full, ours state) on GPU 0, generation on GPU 1, and the
#     data-parallel scaling of state tuning (1 then 2 GPUs) on GPUs 2-3. Logs go to $OUT.
# x4-full: on a 4-GPU host, one training configuration per GPU side by side (about 6-9 min):
#     fla (its cold compile has needed over 240 s), ours full tuning with per-block remat,
#     ours full tuning keeping the matmul outputs (remat "dots"), ours state tuning.
# scaling: on a 4-GPU host alone, state tuning on 1, 2 and 4 GPUs (about 4 min).
# Multi-GPU scaling alone, on nvidia-h100-x2:
#   python3 benchmarks/bench_train_gpu.py --configs ours_state --gpus 1,2 --timeout 250 --out ...
set -u
OUT=${OUT:?set OUT to a folder for the results}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

case ${1:-} in
  kernel)
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
      -k "factored or poison" 2>&1 | tail -15
    timeout 330 python3 benchmarks/bench_wkv.py --shapes all --reps 10 --profile \
      --configs 16:4:1:factored,32:4:1:factored,16:4:1:loop --out "$OUT/wkv_vs_fla.json" \
      2>&1 | grep -v -i warn
    ;;
  train)
    timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 --timeout 240 \
      --configs fla,ours_full,ours_state,ours_full_micro2 --out "$OUT/train_1p6b.json" \
      2>&1 | grep -v -i warn | grep -v '^ '
    ;;
  generate)
    timeout 300 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
      --official on --repeats 3 --out "$OUT/generate_h100.json" 2>&1 | grep -v -i warn
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL \
      timeout 250 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
      --official off --repeats 3 --out "$OUT/generate_h100_command_buffers.json" 2>&1 |
      grep -v -i warn
    ;;
  x4)
    CUDA_VISIBLE_DEVICES=0 timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 \
      --first-gpu 0 --timeout 240 --configs fla,ours_full,ours_state \
      --out "$OUT/train_1p6b.json" >"$OUT/train.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=2 timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 \
      --first-gpu 2 --gpus 1,2 --timeout 280 --configs ours_state \
      --out "$OUT/train_scaling.json" >"$OUT/scaling.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=1
      timeout 300 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
        --official on --repeats 3 --out "$OUT/generate_h100.json"
      XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL \
        timeout 250 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
        --official off --repeats 3 --out "$OUT/generate_h100_command_buffers.json"
    ) >"$OUT/generate.log" 2>&1 &
    wait
    for log in train scaling generate; do
      echo "== $log"; grep -v -i warn "$OUT/$log.log" | grep -v '^ ' | tail -25
    done
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
  scaling)
    timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 1,2,4 --timeout 170 \
      --configs ours_state --out "$OUT/train_scaling.json" 2>&1 | grep GPU
    ;;
  *)
    echo "usage: OUT=DIR bash benchmarks/gpu_session.sh kernel|train|generate|x4|x4-full|scaling" >&2
    exit 2
    ;;
esac
