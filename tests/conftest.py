import os

import pytest

# Tests run Keras on JAX on the CPU unless a test starts a subprocess with another backend;
# the GPU tests need JAX_PLATFORMS=cuda set outside (`make test-gpu` does).
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ["RWKV_CUDA_ON"] = "0"

# moto accepts any credentials; boto3 and pyarrow only need some to be set.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (a free port); yields its endpoint URL, no buckets.

    The credentials are in os.environ for the module, restored afterwards. A module that
    starts Ray must request this fixture before its Ray fixture: Ray workers inherit the
    driver's environment when Ray starts (the endpoint itself is passed explicitly).
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        with pytest.MonkeyPatch.context() as env:
            for key, value in S3_TEST_ENV.items():
                env.setenv(key, value)
            yield f"http://{host}:{port}"
    finally:
        server.stop()
