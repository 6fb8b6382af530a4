"""`ModelConfig` and its named presets.

Presets are sized by parameter count (checked by a test): `tiny` and `small` use the byte-level
vocabulary so they run on a CPU with no tokenizer training; the larger ones follow the GPT-2 and
LLaMA/TinyLlama shapes so their FLOP and memory figures compare with published runs.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A model configuration is inconsistent or names an unknown preset."""


def dataclass_from_dict(cls: type[T], data: dict, what: str, error: type[Exception]) -> T:
    """Build the config dataclass `cls` from untrusted `data` (a TOML table, a JSON message):
    unknown keys and values of the wrong type raise `error` naming the key, instead of
    surfacing later as a TypeError deep inside the program."""
    fields = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"unknown {what} keys: {', '.join(unknown)}")
    values = {}
    for key, value in data.items():
        allowed = typing.get_args(fields[key]) or (fields[key],)  # `int | None` -> (int, None)
        if value is None and type(None) in allowed:
            values[key] = None
        elif isinstance(value, bool) != (bool in allowed):  # bool is an int subclass: no mixing
            raise error(f"{what} key {key!r} must be {_type_names(allowed)}, got {value!r}")
        elif float in allowed and isinstance(value, int | float):
            values[key] = float(value)
        elif any(isinstance(value, t) for t in allowed if isinstance(t, type)):
            values[key] = value
        else:
            raise error(f"{what} key {key!r} must be {_type_names(allowed)}, got {value!r}")
    return cls(**values)


def _type_names(types: tuple) -> str:
    return " or ".join("none" if t is type(None) else t.__name__ for t in types)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 320
    dim: int = 128  # residual stream width
    n_layers: int = 5
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: multi-head attention; fewer than n_heads: GQA
    ffn_dim: int = 352  # SwiGLU hidden width
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}"
            )
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shapes alone (no tensors allocated)."""
        kv_dim = self.kv_heads * self.head_dim
        attention = self.dim * (self.dim + 2 * kv_dim) + self.dim * self.dim
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim
        body = self.n_layers * (attention + mlp + norms) + self.dim  # + final norm
        if not include_embeddings:
            return body
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return body + embeddings

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·d·T."""
        matmul_params = self.num_params(include_embeddings=False) + self.vocab_size * self.dim
        return 6 * matmul_params + 12 * self.n_layers * self.dim * seq_len

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        """This config with a vocabulary for `vocab_size` tokens, rounded up to a multiple of 64
        so the embedding and output matmuls stay aligned for tensor cores."""
        return dataclasses.replace(self, vocab_size=-(-vocab_size // 64) * 64)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return dataclass_from_dict(cls, data, "model config", ConfigError)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, ModelConfig] = {
    # ≈1.05M: for CPU tests and the local simulation.
    "tiny": ModelConfig(),
    # ≈10.7M
    "small": ModelConfig(dim=384, n_layers=6, n_heads=6, ffn_dim=1024, max_seq_len=512),
    # ≈124M, GPT-2 small shape with a LLaMA block.
    "125m": ModelConfig(
        vocab_size=50304, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=2048
    ),
    # ≈360M, GPT-2 medium shape.
    "350m": ModelConfig(
        vocab_size=50304, dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, max_seq_len=2048
    ),
    # ≈1.1B, TinyLlama shape: GQA with 4 KV heads, untied embeddings.
    "1b": ModelConfig(
        vocab_size=32000,
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        ffn_dim=5632,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
    # ≈6.7B, LLaMA-2 7B shape.
    "7b": ModelConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        ffn_dim=11008,
        max_seq_len=4096,
        tie_embeddings=False,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
