"""The one place that picks the attention kernel.

flash-attn's kernel runs when the package imports and the tensors are half precision on CUDA;
everywhere else (CPU, fp32, no flash-attn) torch's `scaled_dot_product_attention` runs. The
import is lazy so the CPU install never needs flash-attn.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def _flash_attn_func():
    """flash-attn's `flash_attn_func`, or None when it is not installed or disabled."""
    if os.environ.get("FEDPT_DISABLE_FLASH_ATTN") == "1":
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_attn_available() -> bool:
    return _flash_attn_func() is not None


def backend_for(q: torch.Tensor) -> str:
    """Which kernel `causal_attention` will use for tensors like `q`: "flash" or "sdpa"."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash"
    return "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention.

    q: [B, T, H, D]; k, v: [B, T, H_kv, D] with H a multiple of H_kv (GQA). Returns [B, T, H, D].
    The [B, T, H, D] layout is flash-attn's native one, so that path needs no transposes.
    """
    if backend_for(q) == "flash":
        return _flash_attn_func()(q, k, v, causal=True)
    # SDPA wants [B, H, T, D]; enable_gqa broadcasts the KV heads without copying them.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.shape[2] != q.shape[2],
    )
    return out.transpose(1, 2)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(QKᵀ/√d + causal mask)·V, for tests. Same layout as `causal_attention`."""
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / q.shape[-1] ** 0.5
    T = q.shape[1]
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)
