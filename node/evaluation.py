"""Validation loss: the mean next-token cross-entropy over the first windows of a split."""

from __future__ import annotations

import numpy as np
import torch

from node.parallel import DistEnv, all_reduce_mean, autocast
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
    """Mean loss over up to `max_batches` global batches of consecutive windows, split across
    ranks; None when the split holds less than one sequence per rank. Every rank calls it."""
    windows = data.num_windows(seq_len)
    per_rank = min(batch_size, windows // env.world_size)
    if per_rank == 0:
        return None
    per_batch = per_rank * env.world_size
    batches = min(max_batches, windows // per_batch)
    was_training = module.training
    module.eval()
    total = torch.zeros((), device=env.device)
    for b in range(batches):
        start = b * per_batch + env.rank * per_rank
        x, y = get_batch(data, np.arange(start, start + per_rank), seq_len)
        with autocast(env.device, amp_dtype):
            _, loss = module(x.to(env.device), y.to(env.device))
        total += loss.float()
    module.train(was_training)
    return float(all_reduce_mean(total / batches, env))
