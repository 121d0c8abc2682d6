"""Checkpoint files: exact round trip, atomic local write, s3:// through a moto server."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

from rwkv_ray.train import checkpoint as ckpt_io


def sample(step: int) -> ckpt_io.TrainCheckpoint:
    rng = np.random.default_rng(step)
    return ckpt_io.TrainCheckpoint(
        trainable=[rng.standard_normal((3, 4)).astype(np.float32), np.arange(5, dtype=np.float32)],
        optimizer=[np.array(step, np.int64), rng.standard_normal(7).astype(np.float32)],
        rng=np.array([0, step], np.uint32),
        global_step=step,
        epoch=1,
        batch=3,
        trainable_paths=["a/kernel", "b/gamma"],
        optimizer_paths=["adamw/iteration", "adamw/m"],
        config={"name": "x"},
        extra={"mlflow_run_id": "abc"},
    )


def assert_same(a: ckpt_io.TrainCheckpoint, b: ckpt_io.TrainCheckpoint) -> None:
    for x, y in zip(
        a.trainable + a.optimizer + [a.rng], b.trainable + b.optimizer + [b.rng], strict=True
    ):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (a.global_step, a.epoch, a.batch, a.extra) == (b.global_step, b.epoch, b.batch, b.extra)


def test_local_round_trip_and_latest(tmp_path):
    for step in (2, 10):
        ckpt_io.write_checkpoint(sample(step), tmp_path / ckpt_io.checkpoint_name(step))
    (tmp_path / "checkpoint_00000099").mkdir()  # incomplete: no meta.json
    latest = ckpt_io.latest_checkpoint(tmp_path)
    assert latest.endswith("checkpoint_00000010")
    assert_same(ckpt_io.read_checkpoint(latest), sample(10))
    # overwriting is atomic: no temporary directories left behind
    ckpt_io.write_checkpoint(sample(10), latest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint_00000002",
        "checkpoint_00000010",
        "checkpoint_00000099",
    ]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt_io.read_checkpoint(tmp_path / "checkpoint_00000099")
    with pytest.raises(ValueError, match="trainable variables differ"):
        sample(2).check_fits(["a/kernel"], ["adamw/iteration", "adamw/m"])


def test_a_cut_off_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    """A meta.json beside a cut-short or missing train_state.npz (a copy interrupted in the
    run's storage): reading it is an IncompleteCheckpointError, and `read_newest` resumes
    from the newest checkpoint that reads whole, naming the one it skipped."""
    for step in (10, 20, 30):
        ckpt_io.write_checkpoint(sample(step), tmp_path / ckpt_io.checkpoint_name(step))
    cut = tmp_path / "checkpoint_00000030" / ckpt_io.STATE_FILE
    cut.write_bytes(cut.read_bytes()[:100])
    (tmp_path / "checkpoint_00000020" / ckpt_io.STATE_FILE).unlink()
    ckpt_io.write_checkpoint(sample(40), tmp_path / "ray_checkpoint")  # Ray's copy ...
    meta = tmp_path / "ray_checkpoint" / ckpt_io.META_FILE
    meta.write_bytes(meta.read_bytes()[:50])  # ... cut off in meta.json: not listed either
    with pytest.raises(ckpt_io.IncompleteCheckpointError, match="not a complete checkpoint"):
        ckpt_io.read_checkpoint(tmp_path / "ray_checkpoint")
    for step in (30, 20):
        with pytest.raises(ckpt_io.IncompleteCheckpointError, match="not a complete checkpoint"):
            ckpt_io.read_checkpoint(tmp_path / ckpt_io.checkpoint_name(step))
    assert_same(ckpt_io.read_newest(tmp_path), sample(10))
    assert capsys.readouterr().err.count("skipping checkpoint") == 2
    assert ckpt_io.read_newest(tmp_path, newer_than=10) is None  # nothing newer reads whole
    assert ckpt_io.read_newest(tmp_path / "none") is None


def test_bfloat16_arrays_come_back_as_bfloat16(tmp_path):
    """bf16 master weights and moments (np.savez alone gives them back as raw 'V2' bytes,
    which the resumed step could not place on a device)."""
    ckpt = sample(3)
    ckpt.trainable[0] = ckpt.trainable[0].astype(ml_dtypes.bfloat16)
    ckpt.optimizer[1] = ckpt.optimizer[1].astype(ml_dtypes.bfloat16)
    ckpt_io.write_checkpoint(ckpt, tmp_path / "c")
    back = ckpt_io.read_checkpoint(tmp_path / "c")
    assert back.trainable[0].dtype == back.optimizer[1].dtype == ml_dtypes.bfloat16
    assert_same(back, ckpt)


def test_s3_round_trip(tmp_path, monkeypatch):
    from moto.server import ThreadedMotoServer

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        ckpt_io.s3_client(endpoint).create_bucket(Bucket="ckpt")
        root = "s3://ckpt/job"
        for step in (4, 8):
            ckpt_io.write_checkpoint(
                sample(step), f"{root}/{ckpt_io.checkpoint_name(step)}", endpoint
            )
        latest = ckpt_io.latest_checkpoint(root, endpoint)
        assert latest == f"{root}/checkpoint_00000008"
        assert_same(ckpt_io.read_checkpoint(latest, endpoint), sample(8))
        assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    finally:
        server.stop()
