"""`RWKV6LayerNorm`: Keras' LayerNormalization (same weights, config and checkpoint names)
with both moments taken in one pass, in float32.

Why not Keras' own call: it takes the mean, then the variance in a second pass over
x - mean, which on a GPU is two reduction kernels per norm (the scaling fuses into the
consumer either way). Here the mean and the mean square of d = x - x[0] are sibling
reductions, one kernel: two kernels less per layer in a decode step (H100 target, 1.6B
shape, compiled without a GPU by benchmarks/gpu_hlo.py). Subtracting a value of the row
keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std. The numbers are those of torch's
F.layer_norm, which the official model uses (tests/test_layer_norm.py).
"""

from __future__ import annotations

import keras
from keras import ops


class RWKV6LayerNorm(keras.layers.LayerNormalization):
    """LayerNormalization over the last axis; arguments as Keras' (`epsilon`, `dtype`, `name`)."""

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        # Both moments from one pass over x - x[0] (sibling reductions, one kernel); the
        # shift keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std. The moments do
        # not depend on the shift, so no gradient flows through it.
        d = x - ops.stop_gradient(x[..., :1])
        mean_d = ops.mean(d, axis=-1, keepdims=True)
        variance = ops.maximum(ops.mean(d * d, axis=-1, keepdims=True) - mean_d * mean_d, 0.0)
        normed = (d - mean_d) * ops.rsqrt(variance + self.epsilon)
        y = normed * ops.cast(self.gamma, "float32") + ops.cast(self.beta, "float32")
        return ops.cast(y, self.compute_dtype)
