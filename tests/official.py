"""Helpers for testing against the official `rwkv` package (CPU, fp32): random checkpoints
in the official layout, written with torch.save, and the official forward pass."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ["RWKV_CUDA_ON"] = "0"


def random_state_dict(
    seed: int,
    vocab_size: int = 97,
    num_layers: int = 2,
    hidden_size: int = 128,
    head_size: int = 64,
    intermediate_size: int | None = None,
    mix_lora: int = 8,
    decay_lora: int = 16,
    time_state: bool = False,
) -> dict[str, np.ndarray]:
    """Random float32 weights of plausible scale (decay from weak to very strong)."""
    rng = np.random.default_rng(seed)
    c, v, h, n = hidden_size, vocab_size, hidden_size // head_size, head_size
    f = intermediate_size or int((c * 3.5) // 32 * 32)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def uniform(*shape, lo=0.0, hi=1.0):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    def linear(out_dim, in_dim):
        return normal(out_dim, in_dim, scale=in_dim**-0.5)

    sd = {"emb.weight": normal(v, c)}
    sd["blocks.0.ln0.weight"] = 1 + normal(c, scale=0.1)
    sd["blocks.0.ln0.bias"] = normal(c, scale=0.1)
    for i in range(num_layers):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1 + normal(c, scale=0.1)
            sd[p + ln + ".bias"] = normal(c, scale=0.1)
        for slot in "xwkvrg":
            sd[p + f"att.time_maa_{slot}"] = uniform(1, 1, c)
        sd[p + "att.time_maa_w1"] = normal(c, 5 * mix_lora, scale=0.1)
        sd[p + "att.time_maa_w2"] = normal(5, mix_lora, c, scale=0.1)
        sd[p + "att.time_decay"] = uniform(1, 1, c, lo=-6.0, hi=1.5)
        sd[p + "att.time_decay_w1"] = normal(c, decay_lora, scale=0.1)
        sd[p + "att.time_decay_w2"] = normal(decay_lora, c, scale=0.1)
        sd[p + "att.time_faaaa"] = normal(h, n, scale=0.5)
        for name in ("receptance", "key", "value", "gate", "output"):
            sd[p + f"att.{name}.weight"] = linear(c, c)
        sd[p + "att.ln_x.weight"] = 1 + normal(c, scale=0.1)
        sd[p + "att.ln_x.bias"] = normal(c, scale=0.1)
        if time_state:
            sd[p + "att.time_state"] = normal(h, n, n, scale=0.5)
        sd[p + "ffn.time_maa_k"] = uniform(1, 1, c)
        sd[p + "ffn.time_maa_r"] = uniform(1, 1, c)
        sd[p + "ffn.key.weight"] = linear(f, c)
        sd[p + "ffn.receptance.weight"] = linear(c, c)
        sd[p + "ffn.value.weight"] = linear(c, f)
    sd["ln_out.weight"] = 1 + normal(c, scale=0.1)
    sd["ln_out.bias"] = normal(c, scale=0.1)
    sd["head.weight"] = linear(v, c)
    return sd


def torch_save(state_dict: dict[str, np.ndarray], path: Path, dtype: str = "float32") -> Path:
    import torch

    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}
    tensors = {k: t.to(getattr(torch, dtype)) for k, t in tensors.items()}
    torch.save(tensors, str(path))
    return path


class OfficialModel:
    """The official `rwkv` package's RWKV on CPU fp32, loaded from a .pth path."""

    def __init__(self, pth_path: Path):
        from rwkv.model import RWKV

        with contextlib.redirect_stdout(io.StringIO()):
            self.model = RWKV(model=str(pth_path)[: -len(".pth")], strategy="cpu fp32")

    def forward(self, tokens: list[int], state=None):
        """-> (logits [T,V] numpy, state list). Does not mutate the state passed in."""
        import copy

        import torch

        state = copy.deepcopy(state)
        with torch.no_grad():
            logits, state = self.model.forward(list(tokens), state, full_output=True)
        logits = logits.float().numpy().reshape(len(tokens), -1)
        return logits, state


def official_state_to_numpy(state) -> list[np.ndarray]:
    return [s.float().numpy().copy() for s in state]
