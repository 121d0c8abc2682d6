"""Request and response models of the HTTP API (pydantic v2, unknown fields rejected).

Ranges are checked here so that a bad value is a 422 naming the field before any model
work; `rwkv_ray.generation` re-checks everything (its ValueError becomes a 400).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# A state or session name: letters, digits, '_', '-', '.', not starting with '.' (no path).
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
# A tuned state logged to MLflow (`rwkv_ray.serve.mlflow_states`): runs:/<id>[/<path>],
# models:/<name>@<alias> or models:/<name>/<version>, optionally prefixed with "mlflow:".
MLFLOW_STATE_PATTERN = (
    r"^(mlflow:)?(runs:/[0-9a-fA-F]{8,64}(/[A-Za-z0-9_.-]+){0,8}"
    r"|models:/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}(@[A-Za-z0-9_-]{1,64}|/[0-9]{1,9}))$"
)
STATE_PATTERN = f"({NAME_PATTERN})|({MLFLOW_STATE_PATTERN})"
_NAME_HELP = "letters, digits, '_', '-' and '.', not starting with '.', no '..', up to 128"
_STATE_HELP = (
    f"a state of the states directory ({_NAME_HELP}), runs:/<run id>[/<path>], "
    "models:/<name>@<alias> or models:/<name>/<version>"
)
_NAMES = {  # field -> (its pattern, what it may be)
    "state": (STATE_PATTERN, _STATE_HELP),
    "session": (NAME_PATTERN, f"a name of {_NAME_HELP}"),
}
MAX_NEW_TOKENS = 4096
MAX_STOP = 4


class _Strict(BaseModel):
    # strict: no coercion (JSON true is not an int, 40.0 not a top-k), except ints as floats.
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateRequest(_Strict):
    """POST /v1/generate: every sampling control of `rwkv_ray.generation.generate`."""

    prompt: str | None = Field(None, max_length=200_000)
    tokens: list[int] | None = Field(None, max_length=100_000)
    max_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    search_mode: Literal["greedy", "topk", "topp"] = "greedy"
    k: int | float | list[int | float] | None = None
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    penalty: float = Field(1.0, gt=0.0, le=10.0)
    penalty_window: int | None = Field(None, ge=1, le=2**31 - 1)
    max_penalty_range: list[int] | None = Field(None, min_length=2, max_length=2)
    alpha_frequency: float = Field(0.0, ge=-10.0, le=10.0)
    alpha_presence: float = Field(0.0, ge=-10.0, le=10.0)
    alpha_decay: float = Field(1.0, ge=0.0, le=1.0)
    token_ban: list[int] = Field(default_factory=list, max_length=1024)
    end_token: int | list[int] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**31)
    state: str | None = Field(None, max_length=600)
    session: str | None = None
    return_state: bool = False
    stream: bool = False

    # Validators rather than Field(pattern=...): a 422 that says what a name may be, not
    # "should match pattern" and the regular expression.
    @field_validator("state", "session")
    @classmethod
    def _name(cls, value: str | None, info: ValidationInfo) -> str | None:
        pattern, what = _NAMES[info.field_name]
        if value is not None and not re.fullmatch(pattern, value):
            raise ValueError(f"'{info.field_name}' must be {what}; got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.tokens is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'tokens' (ids)")
        if isinstance(self.stop, list) and not 1 <= len(self.stop) <= MAX_STOP:
            raise ValueError(f"'stop' takes 1 to {MAX_STOP} strings")
        return self

    def sampling(self) -> dict:
        """Keyword arguments for `generate` (prompt, state and seed excluded)."""
        return dict(
            search_mode=self.search_mode,
            k=self.k,
            temperature=self.temperature,
            penalty=self.penalty,
            penalty_window=self.penalty_window,
            max_penalty_range=self.max_penalty_range,
            alpha_frequency=self.alpha_frequency,
            alpha_presence=self.alpha_presence,
            alpha_decay=self.alpha_decay,
            token_ban=self.token_ban,
            end_token=self.end_token,
            stop=self.stop or None,
        )


class CompletionRequest(_Strict):
    """POST /v1/completions: the OpenAI-compatible subset (n = 1, one prompt)."""

    model: str | None = None
    prompt: str = Field(..., max_length=200_000)
    max_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: Literal[1] = 1
    seed: int | None = Field(None, ge=0, lt=2**31)
    user: str | None = None

    @model_validator(mode="after")
    def _stop_count(self) -> CompletionRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"'stop' takes at most {MAX_STOP} strings")
        return self

    def sampling(self) -> dict:
        """OpenAI semantics: temperature 0 is greedy; otherwise nucleus sampling."""
        if self.temperature == 0:
            return dict(search_mode="greedy", stop=self.stop or None)
        return dict(
            search_mode="topp", k=self.top_p, temperature=self.temperature, stop=self.stop or None
        )


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(_Strict):
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    session: str | None = None
    state: str | None = None  # base64 of a state file (`rwkv_ray.generation.save_state`)
