"""The worker's step loop (`worker.run_epoch`) keeps one step in flight: step n is dispatched
before step n-1 is waited for, and every step is still finished, in order, and logged once
with its own metrics. A fake step and reader record the order of calls (no JAX, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_ray.train import worker
from rwkv_ray.train.config import JobConfig
from rwkv_ray.train.worker import run_epoch

MODEL = {"config": {"vocab_size": 16, "num_layers": 1, "hidden_size": 64}}


class FakeReader:
    steps_per_epoch = 5

    def batches(self, epoch, start_step=0):
        for i in range(start_step, self.steps_per_epoch):
            tokens = np.full((2, 8), 100 * epoch + i, np.int32)
            yield {"tokens": tokens, "loss_mask": np.ones((2, 8), np.float32)}


class FakeStep:
    """dispatch/finish as TrainStep's; the 'loss' of a step is its batch's token value, its
    metrics overridden for the steps in `bad` ({step: metrics})."""

    def __init__(self, bad=None):
        self.events: list[tuple[str, int]] = []
        self.dispatched = 0
        self.bad = bad or {}

    def dispatch(self, state, tokens, mask):
        self.dispatched += 1
        self.events.append(("dispatch", self.dispatched))
        return state + 1, (self.dispatched, float(tokens[0, 0, 0]))

    def finish(self, pending):
        number, value = pending
        self.events.append(("finish", number))
        return {"loss": value, "grad_norm": 1.0, "step_time": 0.5, **self.bad.get(number, {})}


class FakeTracker:
    def __init__(self):
        self.logged: list[tuple[int, float]] = []

    def log_step(self, step, metrics):
        self.logged.append((step, metrics["loss"]))


def test_each_step_is_dispatched_before_the_one_before_it_is_waited_for():
    config = JobConfig.from_dict({"model": MODEL, "data": {"train": "unused"}})
    train, tracker = FakeStep(), FakeTracker()
    position = {"global_step": 0, "epoch": 0, "batch": 1, "rng": None, "extra": {}}
    state, metrics = run_epoch(train, 0, {}, FakeReader(), config, position, 0, 100, tracker, None)

    assert state == 4 and position == {**position, "global_step": 4, "epoch": 1, "batch": 0}
    assert train.events == [
        ("dispatch", 1),
        ("dispatch", 2),
        ("finish", 1),
        ("dispatch", 3),
        ("finish", 2),
        ("dispatch", 4),
        ("finish", 3),
        ("finish", 4),  # the epoch's end waits for its last step
    ]
    # Logged once each, in order, under its own step number and with its own batch's value.
    assert tracker.logged == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert metrics["loss"] == 4.0
    assert metrics["tokens_per_s"] == 16 / 0.5  # this worker's tokens over its step_time


def test_a_step_that_ends_the_job_or_is_checkpointed_is_waited_for_at_once(monkeypatch):
    config = JobConfig.from_dict(
        {"model": MODEL, "data": {"train": "unused"}, "checkpointing": {"every_steps": 2}}
    )
    train, tracker = FakeStep(), FakeTracker()
    reports = []

    def report(train, state, config, position, metrics, rank):
        reports.append((position["global_step"], metrics["loss"], list(train.events)))

    monkeypatch.setattr(worker, "report", report)
    position = {"global_step": 0, "epoch": 0, "batch": 0, "rng": None, "extra": {}}
    run_epoch(train, 0, {}, FakeReader(), config, position, 0, 3, tracker, None)
    # The checkpoint at step 2 is written after step 2 finished, with step 2's metrics.
    assert [(step, loss) for step, loss, _ in reports] == [(2, 1.0)]
    assert reports[0][2][-1] == ("finish", 2)
    assert train.events[-2:] == [("dispatch", 3), ("finish", 3)]  # the job's last step
    assert tracker.logged == [(1, 0.0), (2, 1.0), (3, 2.0)]


@pytest.mark.parametrize(
    "bad_step, metrics, reported",
    [
        (3, {"loss": float("nan")}, [2]),  # between checkpoints: found while step 4 runs
        (4, {"loss": float("inf")}, [2]),  # a checkpoint step: found before its checkpoint
        (2, {"grad_norm": float("nan")}, []),  # a finite loss, a NaN update
    ],
)
def test_a_non_finite_step_stops_the_run_before_its_checkpoint(
    monkeypatch, bad_step, metrics, reported
):
    """A NaN or infinite loss or gradient norm raises NonFiniteStepError, naming the step,
    before any checkpoint of the weights that step left; MLflow still gets the step."""
    config = JobConfig.from_dict(
        {"model": MODEL, "data": {"train": "unused"}, "checkpointing": {"every_steps": 2}}
    )
    train, tracker = FakeStep(bad={bad_step: metrics}), FakeTracker()
    reports = []
    monkeypatch.setattr(worker, "report", lambda *a: reports.append(a[3]["global_step"]))
    position = {"global_step": 0, "epoch": 0, "batch": 0, "rng": None, "extra": {}}
    with pytest.raises(worker.NonFiniteStepError, match=f"step {bad_step}: .*latest checkpoint"):
        run_epoch(train, 0, {}, FakeReader(), config, position, 0, 100, tracker, None)
    assert reports == reported
    assert [step for step, _ in tracker.logged][-1] == bad_step
