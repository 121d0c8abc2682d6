#!/usr/bin/env bash
# The GPU measurements still open for the kernel and training issues, as device calls of
# under 10 minutes each. Every step has its own time limit and writes its JSON under $OUT as
# soon as it has a row, so a step that runs long loses only itself.
#
# Next session's plan:
# 1. On an H100 (none was lent on 2026-11-28 after 06:40) the figures of record for 42k
#    tokens/s, 1.3x fla and 1.5x state, and the kernel against fla:
#      OUT=$OUT bash benchmarks/gpu_session.sh x4       # nvidia-h100-x4: fla / ours full /
#        ours full (bf16 masters, remat) / ours state + profile, one process per GPU
#      OUT=$OUT bash benchmarks/gpu_session.sh kernel   # nvidia-h100-x1, ~9 min
#    With four H200s lent: `x4-h200` (fla, ours and the kernel against fla, one GPU
#    each); with two: `x2-fla` (fla on GPU 0; on GPU 1 ours_full, ours_state, then
#    the kernel against fla with the time left) gives same-run ratios on that card.
# 2. Issue 3's decode goal on an H100 (`decode`, then `decode-spread`: batch 1 spreads
#    +-5% between processes). ba3b2f2 (TimeMix's LoRA products of decoding as reductions,
#    not GEMMs) measured +4.6% at batch 1 on an H200 over four process pairs; `decode-ab`
#    repeats that comparison on an H100: `mkdir .base && git archive c472dfb rwkv_ray
#    benchmarks pyproject.toml | tar -x -C .base` (.base/ in .git/info/exclude), carry
#    [".whl", ".base"], then BASELINE=.base OUT=$OUT bash benchmarks/gpu_session.sh decode-ab.
# 2b. Done (below). d log_w with every log_w near -12 stays at 5.1e-3 relative RMS on the
#    GPU: a fix needs the dr and dk kernels to round their cumsums alike (wkv_kernel_intra.py).
# 3. Kernel v12 (22a944e) measured on an H200 only: `kernel` on an H100 gives its figure of
#    record (on the H200 0.48-0.49 forward, 0.498-0.500 f+b against fla, back to back).
# Done on 2026-11-29 (10:17-10:20, nvidia-h200 x1): `pytest -m gpu tests/test_group_norm_gate.py
# tests/test_token_mix.py` at 13ca5dd (padded rows masked in the ln_x + gate backward):
# 10 passed.
# Done on 2026-11-29 (08:31-08:55, nvidia-h200 x1): the GPU rows of 453f22a's dtype casts
# (float16, mixed, T = 0) and the strong-decay rows (17 passed; the "loop" d log_w trial:
# 5.1e-3 on the GPU either way, 9% slower fallback, not kept), `gpu-tests` at f439bdd
# (163 passed: 45 + 45 + 9 + 44, then the 20 left alone), ours_full 46.79k / ours_state
# 64.71k tokens/s (1.383x).
# Done on 2026-11-29 (06:02-07:01, nvidia-h200 x1): `gpu-tests` at 9b8ca3d (TEST_LIMIT=500:
# 90 algorithm rows, 9 token-mix / gate rows and 46 of the other 66 kernel rows passed; the
# 20 left, `-k "not algorithms and (factored_ieee or decode_step or poisoned)"`, passed
# alone), v12 in the step (ours_full 47.53k, ours_state 65.34k = 1.375x), ours_full after
# the float32 decay parameters under mixed_bfloat16 (47.32k).
# Done on 2026-11-29 (03:44-04:12, nvidia-h200 x1): `kernel-v12` twice (28 GPU tests
# passed each time; v11 -> v12 0.865 -> 0.847 / 3.418 -> 3.370 ms; against fla 0.48 /
# 0.498), bench_decay_gate.py (the gate kernel's programs and warps), `fused-few` (8 warps
# or 4 stages do not make the fused forward win at B4 or B2), v12 against fla once more
# (0.49 / 0.500).
# Done on 2026-11-29 (02:0x-02:45, nvidia-h200 x1): the fused forward against the two-pass
# one at six shapes (fused from 256 heads: B8 T4096 fwd 1.010 -> 0.857 ms), then v11 against
# fla in one process (0.854 / 1.753 = 0.49 forward, 3.442 / 6.818 = 0.505 f+b, back to
# back), its GPU rows (many heads, bf16 log-decays, fused_kept; none failed).
# Done on 2026-11-29 (00:31-00:58, nvidia-h200 x1): bench_kernel_cost.py (a tiny kernel
# 0.72-0.80 us in the decode loop, an extra dependent GEMM about 3.8 us), the first H200
# decode figures (batch 1 571.6, batch 32 12.26k, prefill 61.1k) and profile, then the LoRA
# products as reductions against c472dfb in four process pairs (576.9 -> 603.2 tok/s).
# Done on 2026-11-29 (00:18-00:26, nvidia-h200 x1): `decay-fallback` and `decay-check-kernel`
# at ced9bc3 (dv out of the gate: +5.2% / +2.7% against "chunk" where no head passes, was
# +4.5% / +4.8%; 0.58 / 0.53x fla with fla's decays; 12 GPU rows passed).
# Done on 2026-11-28 (22:30-23:16, nvidia-h200 x1): `gpu-tests` at d947f49 (135 passed, the
# token-mix GPU tests now among them; the 2-GPU test needs an x2), `decay-check-kernel` (the
# per-head gate: B8 T4096 0.988 / 3.534 ms against fla 1.759 / 6.818), a trial `walk-gate`
# (checked launches walking 16 spans a program; the gate from the states pass: both
# rejected, wkv_vs_fla.json `walk_and_states_gate_trial`), `train` as fla,ours_full,ours_state
# on one GPU (47.83k / 64.62k tokens/s; fla's autotune outran its 230 s).
# Done on 2026-11-28 (20:2x-21:1x, nvidia-h200-x2): decay-check-step with the lax.cond
# version of decay_check="call" (-0.9%: XLA's GPU conditional waits on the host for its
# predicate), decay-check-kernel, then both again with each kernel gated in the kernel
# (two launches, one returning at once): +1.8% crossed (47.83k vs 46.98k); "call" the default.
# Done on 2026-11-28 (17:47-18:02, nvidia-h200-x4): `x4-h200` at 43b8a1d (ours 48.54k vs fla
# 36.54k = 1.33x, state 1.36x; the kernel vs fla back to back 0.57 / 0.54; the token-mix
# default tile 16:4:4 the fastest of seven; forward="span_parallel" slower, removed), `dp4`
# (0.966 / 0.934 at 2 / 4 GPUs).
# Done on 2026-11-28 (15:15-15:52, nvidia-h200-x2): `gpu-tests` at 88e2230 (120 passed; the
# 2-GPU test passed after its PYTHONPATH fix); d log_w's state identity (c16deec) timed and
# taken back (-1.9% in the step; its state-gradient pass 0.95 -> 1.32 ms at B8); spans of 32
# and 64 and value splits again slower; exp/head-grad-apart no gain (deleted); profiles of
# both modes with the HLO (gemm_fusion_dot_2690 = 120 weight-gradient GEMMs at ~785
# TFLOP/s); the token-mix kernels (+0.85%, kept).
# Done on 2026-11-28 (12:29-12:45, nvidia-h200-x2): `x2` (1418ce9 against 1cbfd10: the
# per-slot mix matmuls and the ln_x + gate kernel +2.9% full / +3.1% state, kept; the
# group_norm_gate GPU tests), `x2-fla` (47.35k vs fla 36.15k = 1.31x, state 1.39x; v9 vs
# fla B8 T4096 back to back 0.58 / 0.54), profile_train of both modes; then `gpu-tests` on
# one H200 (116 passed; the 4 `stride256` rows failed: spans are powers of 2 of at most
# MAX_BLOCK = 64 tokens since).
# When an x4 is lent, also:
#   OUT=$OUT bash benchmarks/gpu_session.sh dp4          # nvidia-h100-x4, ~4 min: full tuning
#     on 1, 2 and 4 GPUs with the head's gradient reduced once per step (row groups). On
#     2026-11-28 08:22 `dp` came as 2 x H200: 0.940 at 2 GPUs (0.921 on H100s before the fix).
#   OUT=$OUT bash benchmarks/gpu_session.sh dp-profile   # nvidia-h100-x4, ~3 min
# Done on 2026-11-28 (10:25-10:51, H200 only): kernel-stages with the clamped-decay branch
# (both landed as v9), ours_full / ours_state with v9 and ours_full at 84b7386.
# Done on 2026-11-28 (08:2x-08:5x): dp (as H200), bench_decode_gemv.py, the profiles of both
# training modes, bench_wkv on all three shapes against fla in one process, pass1_stride
# 128-512 at B1 T16384 (rejected).
# Done on 2026-11-28 (05:52-06:35): kernel-tf32 ("factored_tf32" the default since), x4 with
# BASELINE (41.45k tokens/s, 1.27x fla), dp4, dp-profile (came as H200), the kernel vs fla.
# kernel-tf32: the GPU tests of mode "factored_tf32" and of dr apart from the state
#     gradients, then bench_wkv at B4 and B8 T4096: "factored" against "factored_tf32" (the
#     factored contractions on the tensor cores in TF32 instead of IEEE float32 FMAs).
# x4 with BASELINE (folders holding older trees): GPU 2 runs their ours_full one after the
#     other beside GPU 1's: 723eca3 (mix slots by indexing, IEEE "factored"), d388662
#     (ops.split, IEEE "factored"), against the TF32 default on GPU 1. (Each tree imports its
#     own rwkv_ray: PYTHONPATH is set to it; /tmp/site holds the carried wheels.)
# On 2026-11-28 04:06 (x1, no fla) v7 of the kernel (per-kernel warps, dr beside the state
# gradients) took the 1.6B step from 39.02k to 39.96k tokens/s; state tuning 54.79k (1.37x).
#
# x4: the 1.6B training figures of record, one process per GPU, all at once: GPU 0 fla;
#     GPU 1 ours without remat (float32 masters, the 1.6B config's setting), then "dots";
#     GPU 2 bf16 masters, then remat of every block (the trade-off table with one copy of
#     the state); GPU 3 state tuning, then a profile of the full step (2026-11-28 01:31:
#     fla 32.5k, ours 38.4k / bf16 masters 40.0k / state 52.2k, profile 428 ms). Our configs
#     need about 150 s each (a 47 s build, a 95 s first step): keep their limit >= 200 s.
#     (On 2026-11-27 23:00 GPU 3 ran `kernel` instead; its forward times were inflated by
#     the busy host: time the kernel alone.)
# train-plan: XLA's planned memory of the 1.6B full-tuning step (B4 T4096) for each remat
#     setting, compiled on the GPU without running a step (bench_train_gpu.py --memory):
#     which settings fit beside the training state (benchmarks/gpu_train_plan.py gives
#     the same without a GPU), and why bf16 master weights needed a larger scratch buffer
#     (61.77 GiB) than float32 ones (54.44) on 2026-11-27.
# train-x4: the configurations of 2026-11-27 23:00's first attempt (GPU 0 fla; GPU 1 no remat,
#     then "dots"; GPU 2 bf16 masters without remat, then with "dots"; GPU 3 remat of 4
#     blocks, then state tuning); x4 has the figures of record since.
# kernel: bench_wkv on the issue's three shapes against fla (fla first), the kernel's default
#     configuration (chunk 16, KERNEL_WARPS, KERNEL_STAGES, factored_tf32). Rejected
#     earlier: chunk 32, warps 2/8 everywhere, pass1_stride 64-512, merge_dk_dv, spans of
#     64 tokens (state_stride 64), two_pass_blocks; 2 or 4 pipeline stages (3 kept).
# decode: the decode-step kernel's GPU tests, then (with BASELINE=dir, a copy of an older
#     tree in the working tree, e.g. `git archive 66b6b2b | tar -x -C baseline`) that tree's
#     decode figures, then ours and the official package's (same run), then a profile of
#     decoding at batch 2 and 32. Batch 1 spreads about +-5% between processes (12
#     processes of 285d47f on 2026-11-27: 477.8-530.4, median 503.5), so compare trees
#     interleaved, one process each, several times.
# decode-spread: five processes of the decode figures one after the other, each with its own
#     range (the repeats paired), to tell within-process noise from the spread between
#     processes; about 8 min.
# scaling: the host alone, state tuning on 1, 2 and 4 GPUs (0.985 / 0.964 on 2026-11-27).
# generate / train: the generation figures alone; the training configurations one after the
#     other on one GPU.
#
# Compile caches: every mode compiles into .gpu_cache/<card>/ (Triton's cache, with fla's
# autotuning results, and JAX's persistent compilation cache), so a call that carries that
# folder (carry [".whl", ".gpu_cache"]; .git/info/exclude ignores it) skips fla's cold start
# (its chunk_rwkv6 kernels autotune: about 4 min of each bench_wkv call, 7 of a training
# call) and our first-step compiles. With GPU_CACHE_SAVE=1 the call leaves the grown caches
# as $OUT/gpu_cache_<card>_triton.tgz and _jax.tgz (each dropped if over the 16-MiB limit
# on files back; two of the 8 files back); unpack here with `tar -xzf F -C .gpu_cache`.
# The folders are per card kind: autotuning measured on an H200 never picks an H100's
# configs, and JAX keys its cache by device kind as well.
set -u
OUT=${OUT:?set OUT to a folder for the results}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9' '_')
card=${card%_}
mkdir -p ".gpu_cache/${card:=unknown}/triton" ".gpu_cache/$card/jax"
export TRITON_CACHE_DIR=$PWD/.gpu_cache/$card/triton TRITON_CACHE_AUTOTUNING=1
export JAX_COMPILATION_CACHE_DIR=$PWD/.gpu_cache/$card/jax

save_caches() {
  local part file
  for part in triton jax; do
    file=$OUT/gpu_cache_${card}_$part.tgz
    tar -czf "$file" -C .gpu_cache "$card/$part"
    if [ "$(stat -c %s "$file")" -gt 16000000 ]; then
      echo "gpu_cache: $part is $(du -sh ".gpu_cache/$card/$part" | cut -f1), over the limit: not saved"
      rm -f "$file"
    fi
  done
}
if [ "${GPU_CACHE_SAVE:-0}" = 1 ]; then
  trap save_caches EXIT
fi

generate() {
  timeout 330 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
    --official on --repeats 3 --pack both --out "$OUT/generate_h100.json" 2>&1 \
    | grep -v -i warn | grep -v '^\[\|ptxas\|^ '
}

# on_gpu GPU LIMIT CONFIGS: bench_train_gpu on one GPU, in the background; CONFIGS is one
# name or several joined by "," (run one after the other), each limited to LIMIT seconds.
on_gpu() {
  local gpu=$1 limit=$2 configs=$3 count
  count=$(($(tr -cd , <<<"$configs" | wc -c) + 1))
  CUDA_VISIBLE_DEVICES=$gpu timeout $((count * (limit + 20))) python3 \
    benchmarks/bench_train_gpu.py --steps 3 --first-gpu "$gpu" --timeout "$limit" \
    --configs "$configs" --out "$OUT/train_gpu$gpu.json" >"$OUT/train_gpu$gpu.log" 2>&1 &
}

# baseline_trees GPU DEFAULT: bench_train_gpu in each folder of $BASELINE (copies of older
# trees, e.g. `git archive REV rwkv_ray benchmarks pyproject.toml`), one after the other on
# GPU, each importing its own rwkv_ray. An entry is "dir" (configs DEFAULT) or "dir=configs"
# ("," joins several, one after the other). Foreground: run it in the background yourself.
baseline_trees() {
  local gpu=$1 default=$2 entry tree configs
  for entry in ${BASELINE:-}; do
    tree=${entry%%=*} configs=$default
    [ "$tree" != "$entry" ] && configs=${entry#*=}
    (cd "$tree" && PYTHONPATH=/tmp/site:$PWD CUDA_VISIBLE_DEVICES=$gpu \
      timeout $((230 * ($(tr -cd , <<<"$configs" | wc -c) + 1))) python3 \
      benchmarks/bench_train_gpu.py --steps 3 --first-gpu "$gpu" --timeout 210 \
      --configs "$configs" --out "$OUT/train_gpu${gpu}_$(basename "$tree").json")
  done
}

# One log file back instead of one per GPU: files back from $OUT are at most 8.
merge_logs() {
  local log
  for log in "$OUT"/train_gpu*.log; do echo "== $log"; cat "$log"; done >"$OUT/train_logs.txt"
  rm -f "$OUT"/train_gpu*.log
}

kernel() {
  timeout 540 python3 benchmarks/bench_wkv.py --shapes all --reps 10 --profile \
    --configs 16:0:0:factored_tf32 --out "$OUT/wkv_vs_fla.json" \
    2>&1 | grep -v -i warn
}

case ${1:-} in
  decode)
    JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
      -k "decode_step" 2>&1 | tail -15
    if [ -n "${BASELINE:-}" ]; then
      (cd "$BASELINE" && PYTHONPATH=$PWD:${PYTHONPATH:-} timeout 150 python3 \
        benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 --official off --repeats 5 \
        --batch-sizes 1,32 --out "$OUT/generate_baseline.json" 2>&1 \
        | grep -v -i warn | grep -v '^\[\|ptxas\|^ ')
    fi
    generate
    timeout 130 python3 benchmarks/profile_generate.py --shape 1b6 --dtype bfloat16 \
      --batch-sizes 2,32 --decode-tokens 32 --top 20 --out "$OUT/profile_generate.json" \
      2>&1 | grep -v -i warn | grep -A3 '"decode_batch\|"name": "memcpy\|wkv6_step'
    ;;
  decode-spread)
    for i in 1 2 3 4 5; do
      timeout 95 python3 benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 \
        --official off --repeats 5 --batch-sizes 1,32 --pack on \
        --out "$OUT/generate_process$i.json" 2>&1 | grep '^decode_batch'
    done
    ;;
  decode-ab)
    # x1, ~8 min: batch-1 decoding of two trees in alternating processes (one process of
    # each per pair, the order swapped every pair: single processes spread +-5%). BASELINE
    # is the other tree (e.g. `git archive REV rwkv_ray benchmarks pyproject.toml` unpacked
    # in an ignored folder that is carried); the working tree is the new one.
    : "${BASELINE:?decode-ab needs BASELINE=<the other tree>}"
    for pair in 1 2 3 4; do
      trees=". $BASELINE"
      [ $((pair % 2)) = 1 ] && trees="$BASELINE ."
      for tree in $trees; do
        (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 \
          benchmarks/bench_generate.py --shape 1b6 --dtype bfloat16 --official off \
          --repeats 5 --batch-sizes 1 --pack on \
          --out "$OUT/decode_ab_${pair}_$(basename "$(realpath "$tree")").json" 2>&1 \
          | grep '^decode_batch' | sed "s|^|$tree |")
      done
    done
    ;;
  kernel) kernel ;;
  kernel-v12)
    # ~9 min: v12 (the dv kernel adds d log_w's cross-span part; the decay gate as one
    # Pallas kernel) -- its GPU tests, then B8 T4096 against fla in one process, then (with
    # BASELINE=dir, a `git archive` of the tree before, e.g. edfc2ad) that tree's kernel
    # and this one's again, no fla, one process each.
    JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 200 python3 -m pytest -q \
      -m gpu -p no:cacheprovider tests/test_wkv_kernel.py -k "decay_gate or poisoned or \
      bf16_log_decays or (matches_reference and not many_heads and ${TESTS_K:-not x})" \
      2>&1 | tail -4
    timeout 330 python3 benchmarks/bench_wkv.py --shapes 8x4096 --reps 10 --profile \
      --configs 16:0:0:factored_tf32 --out "$OUT/wkv_v12_vs_fla.json" 2>&1 | grep -v -i warn
    for tree in ${BASELINE:-} .; do
      (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 benchmarks/bench_wkv.py \
        --no-fla --shapes 8x4096 --reps 10 --profile --configs 16:0:0:factored_tf32 \
        --out "$OUT/wkv_v12_ab_$(basename "$(realpath "$tree")").json" 2>&1 | grep "ours\|kernels" \
        | cut -c1-400)
    done
    ;;
  fused-few)
    # ~3 min, no fla: the fused forward with one program per SM or fewer (B4 and B2 T4096),
    # where v11 keeps the two-pass forward (fused 0.823 against 0.693 ms at B4 on an H200):
    # 8 warps (slower at B8, where two programs share an SM) and 4 stages might hide more
    # of its chunk chain. Compare the forward columns ("fwd ... back to back") only: the
    # warps / stages fields apply to every kernel of the f+b.
    for shape in 4x4096 2x4096; do
      timeout 150 python3 benchmarks/bench_wkv.py --no-fla --shapes $shape --reps 10 --profile \
        --configs 16:0:0:factored_tf32,16:0:0:factored_tf32:fused,16:8:0:factored_tf32:fused,16:0:4:factored_tf32:fused,16:8:4:factored_tf32:fused \
        --out "$OUT/wkv_fused_few_$shape.json" 2>&1 | grep "ours\|kernels" | cut -c1-300
    done
    ;;
  kernel-spans)
    # ~3 min, no fla: the v9 kernel's span (state_stride: tokens between stored states; each
    # program walks that many tokens chunk by chunk) at 16 (the default), 32 and 64 and the
    # sequential passes split in 2 value blocks, B4 and B8 T4096. Spans of 32 halve the
    # entry states' and the state gradients' traffic (0.54 GB each way at B8 in bf16) for
    # one more chained chunk per program. Run 2026-11-28 15:29 (H200): 32 and 64 and the
    # splits all slower than the default (BENCHMARKS.md).
    for shape in 8x4096 4x4096; do
      timeout 150 python3 benchmarks/bench_wkv.py --no-fla --shapes $shape --reps 10 --profile \
        --configs 16:0:0:factored_tf32,16:0:0:factored_tf32:auto:auto::32,16:0:0:factored_tf32:auto:auto::64,16:0:0:factored_tf32:auto:auto::0:0::2 \
        --out "$OUT/wkv_spans_$shape.json" 2>&1 | grep "ours\|kernels" | cut -c1-300
    done
    ;;
  kernel-stages)
    # Triton software pipelining of the sequential passes: with num_stages >= 2 their global
    # loads become cp.async one or two chunks ahead (compile-only PTX of wkv6_states and
    # wkv6_bwd_state_grads_dr, 2026-11-28; the per-chunk kernels have no loop and are
    # unchanged). Every kernel's stages at once (the config's third field). First their
    # GPU test rows (stages2, stages3: strong decay, fp32 and bf16, T 1 / 65 / 4096).
    JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
      -k "stages" 2>&1 | tail -3
    for shape in 4x4096 8x4096 1x16384; do
      timeout 170 python3 benchmarks/bench_wkv.py --no-fla --shapes $shape --reps 10 --profile \
        --configs 16:0:1:factored_tf32,16:0:2:factored_tf32,16:0:3:factored_tf32 \
        --out "$OUT/wkv_stages_$shape.json" 2>&1 | grep "ours\|kernels" | cut -c1-300
    done
    if [ -n "${CLAMPED:-}" ]; then  # a tree of branch exp/clamped-decays: GPU tests, then time
      (cd "$CLAMPED" && PYTHONPATH=/tmp/site:$PWD JAX_PLATFORMS=cuda timeout 200 python3 -m \
        pytest -q -m gpu tests/test_wkv_kernel.py -k "test_gpu_matches_reference" 2>&1 | tail -3
       PYTHONPATH=/tmp/site:$PWD timeout 120 python3 benchmarks/bench_wkv.py --no-fla \
        --shapes 4x4096 --reps 10 --profile --configs 16:0:1:factored_tf32 \
        --out "$OUT/wkv_clamped.json" 2>&1 | grep "ours\|kernels" | cut -c1-300)
    fi
    ;;
  kernel-tf32)
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
      -k "tf32 or dr_apart" 2>&1 | tail -3
    for shape in 4x4096 8x4096; do
      timeout 180 python3 benchmarks/bench_wkv.py --no-fla --shapes $shape --reps 10 --profile \
        --configs 16:0:1:factored,16:0:1:factored_tf32 --out "$OUT/wkv_tf32_$shape.json" \
        2>&1 | grep "ours\|kernels" | cut -c1-300
    done
    ;;
  decay-check-step)
    # nvidia-h200-x2 / h100-x2, ~4 min: the 1.6B full-tuning step with wkv6_kernel's
    # decay_check="call" (the default) against "chunk" (a copy of this tree with that
    # default), crossed: GPU 0 runs "call" then "chunk", GPU 1 the other way.
    mkdir -p /tmp/trees/chunk && cp -r rwkv_ray benchmarks pyproject.toml /tmp/trees/chunk/
    sed -i 's/decay_check="call",$/decay_check="chunk",/' /tmp/trees/chunk/rwkv_ray/ops/wkv_kernel.py
    grep -c 'decay_check="chunk",$' /tmp/trees/chunk/rwkv_ray/ops/wkv_kernel.py
    step() {  # step GPU TREE NAME
      (cd "$2" && PYTHONPATH=/tmp/site:$PWD CUDA_VISIBLE_DEVICES=$1 timeout 230 python3 \
        benchmarks/bench_train_gpu.py --steps 3 --first-gpu "$1" --timeout 210 \
        --configs ours_full --out "$OUT/train_gpu$1_$3.json" 2>&1 | grep GPU | sed "s/^/$3 /")
    }
    (step 0 "$PWD" call; step 0 /tmp/trees/chunk chunk) &
    (step 1 /tmp/trees/chunk chunk; step 1 "$PWD" call) &
    wait
    ;;
  decay-fallback)
    # x1, ~2 min: decay_check "call" against "chunk" where no head passes the gate
    # (bench_wkv.py --decays fallback: channel 0 of every head at -8 a token), one process.
    timeout 300 python3 benchmarks/bench_wkv.py --no-fla --shapes 8x4096 --reps 10 --profile \
      --decays fallback --configs 16:0:0:factored_tf32,16:0:0:factored_tf32+chunk \
      --out "$OUT/wkv_fallback.json" 2>&1 | grep -v -i warn | cut -c1-600
    ;;
  decay-check-kernel)
    # x1, ~5 min: the GPU tests of decay_check="call" (the default), then the kernel against
    # fla on the issue's three shapes with decay_check "chunk" and "call".
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -m gpu tests/test_wkv_kernel.py \
      -k decay_check 2>&1 | tail -2
    timeout 380 python3 benchmarks/bench_wkv.py --shapes all --reps 10 --profile \
      --configs 16:0:0:factored_tf32+chunk,16:0:0:factored_tf32 --out "$OUT/wkv_vs_fla.json" \
      2>&1 | grep -v -i warn | cut -c1-400
    ;;
  token-mix)
    # x1, ~2 min: TimeMix's five token-shift mixes (ops/token_mix.py) alone at the 1.6B
    # step's shape, XLA's fusions of the plain form against the Pallas kernels at several
    # tiles (ROWS:SUBTILES:NUM_WARPS; 16:4:4 the default: its backward spills at 255
    # registers, 4-row tiles do not), then their GPU tests.
    timeout 200 python3 benchmarks/bench_token_mix.py \
      --configs 16:4:4,16:4:8,4:16:4,8:8:4,4:16:2,2:32:2,8:8:8 --out "$OUT/token_mix.json" \
      2>&1 | grep -v -i warn
    JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu tests/test_token_mix.py 2>&1 | tail -2
    ;;
  mix)
    timeout 150 python3 benchmarks/proto_mix_kernel.py --out "$OUT/mix.json" 2>&1 \
      | grep -v -i warn
    ;;
  x4)
    # First the GPU tests of ln_x + gate as a Pallas kernel (group_norm_gate.py), a minute.
    JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -m gpu tests/test_group_norm_gate.py \
      2>&1 | tail -3
    # train-x4's main rows and the kernel in one call: one process per GPU.
    on_gpu 0 540 fla
    on_gpu 1 260 ours_full,ours_full_dots
    if [ -n "${BASELINE:-}" ]; then  # the same configuration from older trees, on GPU 2
      baseline_trees 2 "${BASELINE_CONFIGS:-ours_full}" >"$OUT/train_gpu2.log" 2>&1 &
    else
      on_gpu 2 260 ours_full_bf16,ours_full_remat
    fi
    (
      CUDA_VISIBLE_DEVICES=3 timeout 250 python3 benchmarks/bench_train_gpu.py --steps 3 \
        --first-gpu 3 --timeout 230 --configs ours_state --out "$OUT/train_gpu3.json"
      CUDA_VISIBLE_DEVICES=3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 280 python3 \
        benchmarks/profile_train.py --mode full --remat off --top 60 \
        --out "$OUT/profile_full.json" --hlo-out "$OUT/profile_full_hlo.txt.gz" \
        | grep -A10 '"wall_ms'
    ) >"$OUT/train_gpu3.log" 2>&1 &
    wait
    grep -h -v -i warn "$OUT"/train_gpu*.log | grep 'GPU\|wall_ms\|tokens_per_s\|by_kind' -A1
    merge_logs
    ;;
  x4-h200)
    # nvidia-h200-x4, ~10 min, one process per GPU at once. GPU 0: the token-mix tiles
    # (`token-mix`). GPU 1: fla's model (540 s, its cold compile). GPU 2: ours_full and
    # ours_state (same run as GPU 1: the ratios on this card). GPU 3: the kernel against fla
    # on the issue's three shapes (`kernel`).
    (CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_session.sh token-mix) >"$OUT/train_gpu0.log" 2>&1 &
    on_gpu 1 540 fla
    on_gpu 2 260 ours_full,ours_state
    (CUDA_VISIBLE_DEVICES=3 kernel) >"$OUT/train_gpu3.log" 2>&1 &
    wait
    grep -h -v -i warn "$OUT"/train_gpu*.log | grep 'passed\|failed\|GPU\|ms\|ours\|kernels'
    merge_logs
    ;;
  x2)
    # nvidia-h200-x2 / h100-x2: a tree against older ones on the other GPU, same run. GPU 0:
    # the GPU tests of ln_x + gate as a Pallas kernel, then ours_full and ours_state. GPU 1:
    # each folder of BASELINE ("dir" or "dir=configs"; configs joined by ",", default
    # ours_full,ours_state), one after the other.
    (
      JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -m gpu \
        tests/test_group_norm_gate.py 2>&1 | tail -3
      CUDA_VISIBLE_DEVICES=0 timeout 440 python3 benchmarks/bench_train_gpu.py --steps 3 \
        --first-gpu 0 --timeout 210 --configs "${X2_CONFIGS:-ours_full,ours_state}" \
        --out "$OUT/train_gpu0.json"
    ) >"$OUT/train_gpu0.log" 2>&1 &
    baseline_trees 1 ours_full,ours_state >"$OUT/train_gpu1.log" 2>&1 &
    wait
    grep -h -v -i warn "$OUT"/train_gpu*.log | grep 'passed\|failed\|error\|GPU'
    merge_logs
    ;;
  x2-fla)
    # nvidia-h200-x2 / h100-x2: fla's model on GPU 0 (540 s: its cold compile), and on GPU 1
    # in the same run the GPU test of the dispatcher's kernel + ln_x + gate path (its errors
    # printed), ours_full and ours_state, then the kernel against fla with what time is left.
    on_gpu 0 540 fla
    start=$SECONDS
    (
      JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -q -s -m gpu \
        tests/test_group_norm_gate.py -k dispatcher 2>&1 | grep -v -i warn | tail -6
      CUDA_VISIBLE_DEVICES=1 timeout 440 python3 benchmarks/bench_train_gpu.py --steps 3 \
        --first-gpu 1 --timeout 210 --configs ours_full,ours_state --out "$OUT/train_gpu1.json"
      left=$((570 - (SECONDS - start)))
      [ $left -gt 60 ] && CUDA_VISIBLE_DEVICES=1 timeout $left python3 benchmarks/bench_wkv.py \
        --shapes all --reps 10 --profile --configs 16:0:0:factored_tf32 \
        --out "$OUT/wkv_vs_fla.json" 2>&1 | grep -v -i warn
    ) >"$OUT/train_gpu1.log" 2>&1 &
    wait
    grep -h -v -i warn "$OUT"/train_gpu*.log | grep 'passed\|failed\|float\|GPU\|ms'
    merge_logs
    ;;
  gpu-tests)
    # Every GPU test (`pytest -m gpu`) in four processes, two per GPU on an x2 (all four on
    # one GPU of an x1), then on an x2 the 2-GPU test (the real kernel on both GPUs under a
    # data-parallel mesh).
    second=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
    run_tests() {  # GPU LOG ARGS...: one pytest process on one GPU
      local gpu=$1 log=$2; shift 2
      JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=$gpu XLA_PYTHON_CLIENT_PREALLOCATE=false \
        timeout "${TEST_LIMIT:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider "$@" \
        >"$OUT/$log" 2>&1 &
    }
    run_tests 0 tests_alg_fp32.log tests/test_wkv_kernel.py -k "algorithms and fp32"
    run_tests 0 tests_alg_bf16.log tests/test_wkv_kernel.py -k "algorithms and bf16"
    run_tests $second tests_kernel.log tests/test_wkv_kernel.py -k "not algorithms"
    run_tests $second tests_gate.log tests/test_group_norm_gate.py tests/test_token_mix.py
    wait
    [ "$second" = 1 ] && JAX_PLATFORMS=cuda WKV_TEST_GPU=1 timeout 120 python3 -m pytest -q \
      -m gpu -p no:cacheprovider tests/test_wkv_kernel_sharded.py >"$OUT/tests_sharded.log" 2>&1
    for log in "$OUT"/tests_*.log; do echo "== $log"; grep -v -i warn "$log" | tail -4; done
    ;;
  generate) generate ;;
  train)
    timeout 570 python3 benchmarks/bench_train_gpu.py --steps 3 --timeout 240 \
      --configs fla,ours_full_remat,ours_state --out "$OUT/train_1p6b.json" \
      2>&1 | grep -v -i warn | grep -v '^ '
    ;;
  train-x4)
    # fla needs its 540 s (cold compile). Ours two configurations per GPU, one after the
    # other; state tuning beside our remat baseline (its goal is relative to full tuning).
    on_gpu 0 540 fla
    on_gpu 1 260 ours_full,ours_full_dots
    on_gpu 2 260 ours_full_bf16,ours_full_bf16_dots
    on_gpu 3 260 ours_full_remat4,ours_state
    wait
    grep -h -v -i warn "$OUT"/train_gpu*.log | grep GPU
    ;;
  train-plan)
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 560 python3 benchmarks/bench_train_gpu.py \
      --memory --timeout 110 --out "$OUT/train_plan.json" --configs \
      ours_full,ours_full_bf16,ours_full_dots,ours_full_bf16_dots,ours_full_remat8,ours_full_remat10,ours_full_remat12 \
      2>&1 | grep GPU
    ;;
  dp)
    # nvidia-h100-x2: full tuning data-parallel with AdamW's moments split over the GPUs
    # (scaling.shard_optimizer); without remat XLA's plan for 2 GPUs is 66.7 GiB with it
    # (78.3 before XLA's own remat) against 83.2 without (train_plan_dp.json): does it fit,
    # and what is its scaling against 1 GPU? About 2 x 150 s.
    timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 1,2 --timeout 250 \
      --configs ours_full_zero1 --out "$OUT/train_dp.json" 2>&1 | grep GPU
    ;;
  dp4)
    # nvidia-h100-x4: the same over 1 (GPU 2) and 2 (GPUs 0-1) GPUs side by side, then over 4.
    CUDA_VISIBLE_DEVICES=2 timeout 260 python3 benchmarks/bench_train_gpu.py --steps 3 \
      --gpus 1 --first-gpu 2 --timeout 240 --configs ours_full_zero1 \
      --out "$OUT/train_dp1.json" 2>&1 | grep GPU &
    timeout 260 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 2 --timeout 240 \
      --configs ours_full_zero1 --out "$OUT/train_dp2.json" 2>&1 | grep GPU
    wait
    timeout 280 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 4 --timeout 260 \
      --configs ours_full_zero1 --out "$OUT/train_dp4.json" 2>&1 | grep GPU
    ;;
  dp-profile)
    # nvidia-h100-x4: where the 4-GPU step's time goes (GPU 0's kernels, collectives apart;
    # device_span_ms less device_compute_ms is the time GPU 0 computes nothing).
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout 300 python3 benchmarks/profile_train.py \
      --mode full --remat off --gpus 4 --shard-optimizer --top 40 \
      --out "$OUT/profile_full_dp4.json" 2>&1 | grep -A12 '"wall_ms'
    ;;
  dp-dots)
    # nvidia-h100-x2: the 1.6B config's current multi-GPU setting ("dots") on 2 GPUs, with and
    # without the split optimizer state.
    timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 2 --timeout 250 \
      --configs ours_full_dots,ours_full_dots_zero1 --out "$OUT/train_dp_dots.json" 2>&1 | grep GPU
    ;;
  scaling)
    timeout 560 python3 benchmarks/bench_train_gpu.py --steps 3 --gpus 1,2,4 --timeout 170 \
      --configs ours_state --out "$OUT/train_scaling.json" 2>&1 | grep GPU
    ;;
  *)
    echo "usage: OUT=DIR bash benchmarks/gpu_session.sh decode|decode-spread|kernel|x4-h200|decay-check-step|decay-check-kernel|kernel-spans|kernel-stages|kernel-tf32|mix|x4|x2|x2-fla|gpu-tests|train-plan|train-x4|dp|dp4|dp-profile|dp-dots|scaling|generate|train" >&2
    exit 2
    ;;
esac
