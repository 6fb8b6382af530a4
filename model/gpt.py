"""A LLaMA-style decoder-only transformer, readable top to bottom.

token ids ─► embedding ─► n_layers × Block ─► RMSNorm ─► output projection ─► logits
Block:  x + Attention(RMSNorm(x))  then  x + FeedForward(RMSNorm(x))

Parameter names follow Meta's LLaMA checkpoints (tok_embeddings, layers.N.attention.wq, …).
Parallelism, precision and activation checkpointing are applied from outside (node/parallel.py):
nothing here knows about devices beyond what the input tensors carry. Inference passes a KV cache
(model/generation.py) down the same forward; training passes none and runs exactly as without it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import causal_attention
from model.config import ModelConfig
from model.generation import KVCache, LayerCache, generate_tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares loses precision in bf16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [max_seq_len, head_dim // 2], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by the position's angle ("rotate half", as HF Llama does).

    x: [B, T, H, D]; cos, sin: [T, D/2].
    """
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """cos, sin: the rotary tables at these tokens' positions; with `cache`, the tokens
        follow the cached ones and attend to them too."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # [B, T, H, D]; a cache appends these k, v and attends over all it holds
        out = causal_attention(q, k, v) if cache is None else cache.attend(q, k, v)
        return self.wo(out.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not persistent: derived from the config, so never saved, sent or averaged.
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/√(2·n_layers)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at 1
            is_residual_out = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
            nn.init.normal_(p, mean=0.0, std=residual_std if is_residual_out else std)
        cos, sin = rope_tables(
            self.config.head_dim, self.config.max_seq_len, self.config.rope_theta
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens, targets: [B, T] int64. Returns logits [B, T, vocab] and the mean
        cross-entropy over all target tokens (None without targets).

        With `cache` (inference), `tokens` sit at positions cache.length.. after the cached
        ones, whose keys and values they attend to; the cache then holds them as well."""
        T = tokens.shape[1]
        start = 0 if cache is None else cache.length
        if self.config.max_seq_len < start + T:
            raise ValueError(
                f"sequence length {start + T} exceeds max_seq_len {self.config.max_seq_len}"
            )
        cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]
        x = self.tok_embeddings(tokens)
        if cache is None:  # training: the blocks are called exactly as the wrappers expect
            for layer in self.layers:
                x = layer(x, cos, sin)
        else:
            for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
                x = layer(x, cos, sin, layer_cache)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits, None
        # fp32 loss: a bf16 log-softmax over a large vocabulary is visibly noisy.
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """`prompt` ([1, T]) followed by up to `max_new_tokens` sampled tokens, ending early
        after `eos_id`; temperature 0 is greedy. See model/generation.py."""
        new_tokens = []
        steps = generate_tokens(self, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, generator=generator, use_cache=use_cache)  # fmt: skip
        for token in steps:
            new_tokens.append(token)
            if eos_id is not None and int(token) == eos_id:
                break
        return torch.cat((prompt, *new_tokens), dim=1)
