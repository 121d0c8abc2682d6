import os

# Tests run Keras on JAX on the CPU unless a test starts a subprocess with another backend.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ["RWKV_CUDA_ON"] = "0"
