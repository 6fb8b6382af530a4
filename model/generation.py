"""Inference: a key/value cache, the sampling rule and the generation loop.

Without a cache every new token re-runs the model over the whole context (O(T²) work per
token); with one, the prompt is run once (prefill) and each later step feeds only the newest
token, whose query attends to the keys and values the cache kept from earlier steps.

    prompt ─► prefill (fills the cache) ─► sample ─► feed 1 token ─► sample ─► …

The model must fit its context in max_seq_len positions: once the cache is full, the next step
starts it again from the last max_seq_len tokens (a sliding window), which is exactly the
context the uncached loop crops to, so both paths sample from the same logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.gpt import GPT
    from model.tokenizer import Tokenizer


class LayerCache:
    """One attention layer's keys and values for positions 0..length-1.

    Buffers are allocated at max_len on first use (in the dtype and device of the first keys,
    so autocast is respected) and written in place: no per-token concatenation.
    """

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None  # [B, H_kv, max_len, D]: SDPA's layout
        self.v: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' k, v, then let their queries attend to every cached position
        and, causally, to each other. q: [B, T, H, D]; k, v: [B, T, H_kv, D]; returns
        [B, T, H, D] like `model.attention.causal_attention`."""
        B, T, H_kv, D = k.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        if self.k is None or self.k.shape[0] != B or self.k.dtype != k.dtype:
            self.k = k.new_empty(B, H_kv, self.max_len, D)
            self.v = v.new_empty(B, H_kv, self.max_len, D)
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        self.length = end
        if T == 1:
            mask, causal = None, False  # one query may see every cached position
        elif start == 0:
            mask, causal = None, True  # prefill: the ordinary causal square
        else:  # T new queries after `start` cached keys: query i sees keys 0..start+i
            mask, causal = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(start), False
        # SDPA on every device: flash-attn's causal mask is not offset by the cached length.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            self.k[:, :, :end],
            self.v[:, :, :end],
            attn_mask=mask,
            is_causal=causal,
            enable_gqa=H_kv != q.shape[2],
        )
        return out.transpose(1, 2)


class KVCache:
    """The per-layer caches of one model; `length` positions are filled in every layer."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.layers = [LayerCache(max_len) for _ in range(n_layers)]

    @classmethod
    def for_model(cls, model: GPT) -> KVCache:
        return cls(model.config.n_layers, model.config.max_seq_len)

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def reset(self) -> None:
        """Forget every position (the buffers are kept for reuse)."""
        for layer in self.layers:
            layer.length = 0


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token [B, 1] from fp32 logits [B, vocab]; temperature 0 is greedy (argmax),
    top_k None and top_p 1.0 are off. top_p keeps the smallest set of likeliest tokens whose
    probability reaches top_p (the likeliest token always stays)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the likelier ones already reach top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate_tokens(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield up to `max_new_tokens` new tokens ([B, 1] each) continuing `prompt` ([B, T]).

    use_cache=False re-runs the model over the whole (cropped) context per token; both paths
    give the same tokens up to float rounding of the logits.
    """
    window = model.config.max_seq_len
    cache = KVCache.for_model(model) if use_cache else None
    tokens = prompt
    feed = prompt[:, -window:]  # what the next forward runs over
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + feed.shape[1] > window:
            cache.reset()  # full: prefill the last `window` tokens again (sliding window)
            feed = tokens[:, -window:]
        logits = model(feed, cache=cache)[0][:, -1, :].float()
        next_token = sample_next(
            logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        tokens = torch.cat((tokens, next_token), dim=1)
        yield next_token
        feed = next_token if cache is not None else tokens[:, -window:]


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop: str | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> str:
    """The prompt and its continuation as text. Generation ends at the end-of-text token, after
    `max_new_tokens`, or as soon as the new text contains `stop`; the text is cut before it."""
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]  # an empty prompt starts a new document
    prompt_tensor = torch.tensor([ids], dtype=torch.long, device=model.rope_cos.device)
    new_ids: list[int] = []
    steps = generate_tokens(model, prompt_tensor, max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache)  # fmt: skip
    for token in steps:
        new_ids.append(int(token))
        if new_ids[-1] == tokenizer.eos_id:
            break
        if stop:
            new_text = tokenizer.decode(new_ids)
            if stop in new_text:
                return tokenizer.decode(ids) + new_text[: new_text.index(stop)]
    return tokenizer.decode(ids + new_ids)
