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
stacked rows (prefill, big batches) the layers use their own Dense kernels (`packs`):
slicing the packed matrix there would copy it on every call.

`pack_kernels(model)` builds the packed kernels from a model's current weights, in the
compute dtype: a copy (TimeMix 4*C^2 and ChannelMix (F + C)*C per layer: 1.7 GB for the
1.6B shape in bf16), made once per model by the generation engine.
"""

from __future__ import annotations

from keras import ops

# Stacked rows up to which one packed matmul is used (H100, 1.6B shape, bf16, whole decode
# steps: faster at 8 stacked rows (batch 2), slower at 128 (batch 32); bench_generate.py
# --pack both). Up to batch 8 (32 rows of r|k|v|g) packs.
ROW_LIMIT = 32


def time_mix_dense(block) -> tuple:
    """The Dense layers packed for a block's TimeMix, in packed order."""
    att = block.time_mix
    return att.receptance, att.key, att.value, att.gate


def ffn_dense(block) -> tuple:
    """The Dense layers packed for a block's ChannelMix, in packed order."""
    return block.channel_mix.key, block.channel_mix.receptance


def pack_kernels(backbone) -> list[tuple]:
    """Per layer, (TimeMix r|k|v|g [C, 4C], ChannelMix key|receptance [C, F + C]) in the
    backbone's compute dtype."""
    dtype = backbone.dtype_policy.compute_dtype

    def pack(layers):
        return ops.concatenate([ops.cast(d.kernel, dtype) for d in layers], axis=1)

    return [(pack(time_mix_dense(b)), pack(ffn_dense(b))) for b in backbone.blocks]


def packs(inputs) -> bool:
    """Whether these inputs ([B, T, C_in] each) are few enough rows for one packed matmul."""
    return len(inputs) * ops.shape(inputs[0])[0] * ops.shape(inputs[0])[1] <= ROW_LIMIT


def packed_matmul(inputs, kernel, widths):
    """[x_i @ kernel[:, block i] for each i]: inputs are [B, T, C_in], block i is widths[i]
    columns wide. One matmul where `packs(inputs)`, else one per column slice."""
    batch, steps = ops.shape(inputs[0])[0], ops.shape(inputs[0])[1]
    kernel = ops.cast(kernel, inputs[0].dtype)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    rows = batch * steps
    if not packs(inputs):
        return [
            ops.matmul(x, kernel[:, start : start + width])
            for x, start, width in zip(inputs, offsets, widths, strict=True)
        ]
    stacked = ops.concatenate([ops.reshape(x, (rows, -1)) for x in inputs], axis=0)
    full = ops.matmul(stacked, kernel)  # [n * rows, sum(widths)]
    return [
        ops.reshape(full[i * rows : (i + 1) * rows, start : start + width], (batch, steps, width))
        for i, (start, width) in enumerate(zip(offsets, widths, strict=True))
    ]
