"""The foundation demo: a tiny RWKV6 from the official init, exported to an official .pth,
converted back, loaded both ways and scored on a text with the World tokenizer.

The fine-tuning service replaces this with the full job (prepare, tune, track, generate)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from keras import ops

from rwkv_ray.convert import convert_checkpoint, export_checkpoint, load_model
from rwkv_ray.models import RWKV6CausalLM, RWKV6Config
from rwkv_ray.tokenizer import WorldTokenizer

DEMO_TEXT = (
    "RWKV is an RNN with transformer-level LLM performance. It can be directly trained "
    "like a GPT transformer (parallelizable), and it keeps a constant-size state at inference."
)


def mean_negative_log_likelihood(model: RWKV6CausalLM, token_ids: list[int]) -> float:
    """Mean next-token cross-entropy (nats) of one sequence."""
    logits, _ = model.forward(np.array([token_ids]))
    log_probs = ops.log_softmax(logits[0, :-1], axis=-1)
    picked = ops.take_along_axis(log_probs, ops.array(token_ids[1:])[:, None], axis=-1)
    return float(-ops.mean(picked))


def run_demo(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    config = RWKV6Config(
        vocab_size=65536, num_layers=2, hidden_size=128, checkpoint_dtype="float32"
    )
    model = RWKV6CausalLM.from_model_config(config)
    pth = export_checkpoint(model, out_dir / "tiny-random.pth")
    print(
        f"[1/4] built a {config.num_layers}-layer C={config.hidden_size} RWKV6 with the "
        f"official init and exported it to {pth}"
    )
    converted = convert_checkpoint(pth, out_dir / "tiny-random")
    print(f"[2/4] converted it to {converted}/")
    from_dir, from_pth = load_model(converted), load_model(pth)
    tokenizer = WorldTokenizer()
    tokens = tokenizer.encode(DEMO_TEXT)
    nll_dir = mean_negative_log_likelihood(from_dir, tokens)
    nll_pth = mean_negative_log_likelihood(from_pth, tokens)
    print(
        f"[3/4] loaded it from the directory and from the .pth: NLL {nll_dir:.4f} / "
        f"{nll_pth:.4f} nats per token on {len(tokens)} tokens"
    )
    if abs(nll_dir - nll_pth) > 1e-5:
        raise RuntimeError("the converted model and the .pth disagree")
    print(
        f"[4/4] perplexity {np.exp(nll_dir):.1f} (an untrained model: about the vocabulary "
        f"size, {config.vocab_size}); done in {time.perf_counter() - started:.1f} s"
    )
