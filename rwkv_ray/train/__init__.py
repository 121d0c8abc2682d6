"""Fine-tuning on Ray Train: config, loss, step, checkpoints, tracking, worker, trainer.

`loss`, `step` and `checkpoint` know nothing about Ray; `worker`, `trainer` and `tracking`
are the only modules that import ray or mlflow."""
