"""Validation loss: the mean next-token cross-entropy over the first windows of a split; and
bits per byte, the same loss per byte of text, which compares across tokenizers."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from node.parallel import DistEnv, autocast
from node.shards import TokenShards, get_batch


@torch.no_grad()
def mean_loss(
    module: torch.nn.Module,
    data: TokenShards,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    env: DistEnv,
    amp_dtype: torch.dtype | None = None,
) -> float | None:
    """Mean loss over the first min(all, max_batches·batch_size) windows of `data`, split
    evenly across ranks so the figure does not depend on the number of ranks; None when there
    is not one window per rank. Every rank calls it (FSDP forwards are collective)."""
    per_rank = min(data.num_windows(seq_len), max_batches * batch_size) // env.world_size
    if per_rank == 0:
        return None
    first = env.rank * per_rank
    was_training = module.training
    module.eval()
    total = torch.zeros((), device=env.device, dtype=torch.float64)
    for start in range(first, first + per_rank, batch_size):
        ids = np.arange(start, min(start + batch_size, first + per_rank))
        x, y = get_batch(data, ids, seq_len)
        with autocast(env.device, amp_dtype):
            _, loss = module(x.to(env.device), y.to(env.device))
        total += loss.double() * len(ids)  # the loss is a mean over this batch's sequences
    module.train(was_training)
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / (per_rank * env.world_size)


def bits_per_byte(loss: float, data: TokenShards, *, seq_len: int, windows: int,
                  byte_lengths: list[int]) -> float | None:  # fmt: skip
    """`loss` (nats per token, the mean over the first `windows` windows) as bits per UTF-8
    byte of the text those windows predict; None when they predict no text."""
    lengths = np.asarray(byte_lengths, dtype=np.int64)
    tokens = scored = 0
    for start in range(0, windows, 256):
        _, y = get_batch(data, np.arange(start, min(start + 256, windows)), seq_len)
        tokens += y.numel()
        scored += int(lengths[y.numpy().clip(0, len(lengths) - 1)].sum())
    return loss * tokens / (scored * math.log(2)) if scored else None


def scored_windows(data: TokenShards, seq_len: int, batch_size: int, max_batches: int) -> int:
    """How many windows mean_loss scores on one rank."""
    return min(data.num_windows(seq_len), max_batches * batch_size)
