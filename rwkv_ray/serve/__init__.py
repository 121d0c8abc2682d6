"""Ray Serve application for RWKV6 generation: HTTP routes, sessions, tuned states.

- `rwkv_ray.serve.app`: the FastAPI ingress deployment and `app_builder(args)`.
- `rwkv_ray.serve.schemas`: request and response models (unknown fields rejected).
- `rwkv_ray.serve.sessions`: the server-side session state cache (LRU by bytes, expiry).
- `rwkv_ray.serve.states`: the tuned-state registry (a directory of state files).
- `rwkv_ray.serve.mlflow_states`: tuned states logged to MLflow (runs:/..., models:/...@alias).

Requests are decoded together by `rwkv_ray.generation.batcher.ContinuousBatcher`.

Importing this package does not import ray; `app` does.
"""
