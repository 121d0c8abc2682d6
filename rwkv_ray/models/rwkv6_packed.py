"""Packed projection kernels: several projections of one sub-layer as one weight read.

Decoding a token reads every weight once, at a handful of rows per matmul, so a step costs
what its matmuls take to stream their weights. Small matmuls stream them slowly: on an H100
the 1.6B shape's per-token projections ran at 1.28 TB/s one matmul per projection and
1.53 TB/s with TimeMix's r|k|v|g and ChannelMix's key|receptance each as one matmul
(batch 2; `benchmarks/bench_decode_gemm.py`). Whole decoding at batch 1 (2 rows on a GPU):
440 -> 486 tokens/s; at batch 32 packed was slower (9.51k -> 9.34k), hence `ROW_LIMIT`.

Those projections read different inputs (each its own token-shift mix), so one matmul
stacks the inputs on rows and the kernels on columns: [n*M, C] @ [C, sum(widths)], of
which block (i, i) is projection i of input i. The other blocks are wasted arithmetic,
free while the rows are few (the matmul is bound by the weight read). Above `ROW_LIMIT`
rows per input (prefill, big batches) the layers use their own Dense kernels (`packs`):
slicing the packed matrix there would copy it on every call.

TimeMix's packed kernel also carries the decay LoRA's first matrix (decay_w1, [C, D]) as
its last D columns, with x_w as a fifth stacked input, when that matrix is stored in the
compute dtype (so packing it rounds nothing): one weight read and two kernels less per
layer. That block comes back in float32 (`float32_blocks`), as the unpacked float32 matmul
computes it: the decay must not pass through bf16.

On the same path (few rows) TimeMix's LoRA products (maa_w1, maa_w2, decay_w2) are float32
multiply + sums (`row_product`), not GEMMs: a dependent GEMM kernel in the decode loop
costs about 4 us beyond its bytes (H200), these matrices are under 0.7 MB, and XLA fuses a
reduction with the elementwise work around it. Batch 1 decoding of the 1.6B shape on an
H200: 577 -> 603 tokens/s, means of four process pairs (BENCHMARKS.md).

`pack_kernels(model)` builds the packed kernels from a model's current weights, in the
compute dtype: a copy (TimeMix 4*C^2 (+ C*D) and ChannelMix (F + C)*C per layer: 1.7 GB
for the 1.6B shape in bf16), made once per model by the generation engine.
"""

from __future__ import annotations

from keras import ops

# Rows per input up to which one packed matmul is used (H100, 1.6B shape, bf16, whole
# decode steps: faster at batch 2, slower at batch 32; bench_generate.py --pack both).
ROW_LIMIT = 8


def time_mix_dense(block) -> tuple:
    """The Dense layers packed for a block's TimeMix, in packed order."""
    att = block.time_mix
    return att.receptance, att.key, att.value, att.gate


def packs_decay(time_mix) -> bool:
    """Whether TimeMix's decay_w1 joins its packed kernel: stored in the compute dtype."""
    return time_mix.decay_w1.dtype == time_mix.dtype_policy.compute_dtype


def ffn_dense(block) -> tuple:
    """The Dense layers packed for a block's ChannelMix, in packed order."""
    return block.channel_mix.key, block.channel_mix.receptance


def pack_kernels(backbone) -> list[tuple]:
    """Per layer, (TimeMix r|k|v|g[|decay_w1] [C, 4C (+ D)], ChannelMix key|receptance
    [C, F + C]) in the backbone's compute dtype."""
    dtype = backbone.dtype_policy.compute_dtype

    def pack(kernels):
        return ops.concatenate([ops.cast(k, dtype) for k in kernels], axis=1)

    packed = []
    for block in backbone.blocks:
        att = [d.kernel for d in time_mix_dense(block)]
        if packs_decay(block.time_mix):
            att.append(block.time_mix.decay_w1)
        packed.append((pack(att), pack([d.kernel for d in ffn_dense(block)])))
    return packed


def packs(inputs) -> bool:
    """Whether these inputs ([B, T, C_in] each) are few enough rows for one packed matmul."""
    return ops.shape(inputs[0])[0] * ops.shape(inputs[0])[1] <= ROW_LIMIT


def row_product(x, kernel):
    """x @ kernel in float32 as a multiply + sum, for the LoRA matrices of decoding (x:
    [..., K]; kernel [K, N], or [S, K, N] against x [..., S, K]). Those matrices are small
    (C x 160 at most): a GEMM kernel for each costs its start and drain, not its read (on an
    H200 each extra dependent GEMM kernel in the decode loop cost about 4 us,
    benchmarks/bench_kernel_cost.py), while XLA fuses a multiply + sum with the elementwise
    work around it into one reduction. The products are exact in float32, as in the GEMM;
    only the order of the sum differs."""
    product = ops.expand_dims(ops.cast(x, "float32"), -1) * ops.cast(kernel, "float32")
    return ops.sum(product, axis=-2)


def packed_matmul(inputs, kernel, widths, float32_blocks=()):
    """[x_i @ kernel[:, block i] for each i]: inputs are [B, T, C_in], block i is widths[i]
    columns wide. One matmul where `packs(inputs)`, else one per column slice. Blocks
    whose index is in `float32_blocks` come back in float32 (the product of the inputs'
    values accumulated in float32, not rounded to their dtype), the others in the inputs'
    dtype."""
    batch, steps = ops.shape(inputs[0])[0], ops.shape(inputs[0])[1]
    dtype = inputs[0].dtype
    kernel = ops.cast(kernel, dtype)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    rows = batch * steps

    def out(i, block):
        return block if i in float32_blocks else ops.cast(block, dtype)

    if float32_blocks:
        # A float32 matmul of the (exactly converted) inputs: XLA reads the kernel in its
        # own dtype and converts in the GEMM's registers.
        inputs = [ops.cast(x, "float32") for x in inputs]
        kernel = ops.cast(kernel, "float32")
    if not packs(inputs):
        return [
            out(i, ops.matmul(x, kernel[:, start : start + width]))
            for i, (x, start, width) in enumerate(zip(inputs, offsets, widths, strict=True))
        ]
    stacked = ops.concatenate([ops.reshape(x, (rows, -1)) for x in inputs], axis=0)
    full = ops.matmul(stacked, kernel)  # [n * rows, sum(widths)]
    return [
        out(
            i,
            ops.reshape(
                full[i * rows : (i + 1) * rows, start : start + width], (batch, steps, width)
            ),
        )
        for i, (start, width) in enumerate(zip(offsets, widths, strict=True))
    ]
