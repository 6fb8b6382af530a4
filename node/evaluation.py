"""Validation loss: the mean next-token cross-entropy over the first windows of a split."""

from __future__ import annotations

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
