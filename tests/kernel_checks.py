"""Checks shared by the tests of the Pallas kernels that replace a plain JAX form (the ln_x +
gate kernel, the token-mix kernels): the kernel's outputs and gradients against the plain
form's, by relative RMS."""

from __future__ import annotations

import numpy as np


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (relative RMS)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_form(names, ours, theirs):
    for name, got, want in zip(names, ours, theirs, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name


def assert_close(names, ours, theirs, bound, label):
    """float32: every result within `bound` relative RMS of the plain form's."""
    errors = {name: rel(x, y) for name, x, y in zip(names, ours, theirs, strict=True)}
    print(f"{label}:", errors)
    assert max(errors.values()) < bound, errors


def assert_no_less_exact(names, ours, theirs, truth, label):
    """bf16: the kernel's results and the plain form's against `truth` (the plain form on
    float32 copies of the same inputs). The kernel no more than 10% further from it than the
    plain form, or within 4e-3 (about one bf16 ulp on every element) where few elements make
    the figures noisy. Their roundings differ: the kernels compute in float32 and round once
    per output."""
    for name, got, want, exact in zip(names, ours, theirs, truth, strict=True):
        err, plain_err = rel(got, exact), rel(want, exact)
        print(f"{label} {name}: kernel {err:.2e}, plain form {plain_err:.2e}")
        assert err <= max(1.1 * plain_err, 4e-3), (name, err, plain_err)
