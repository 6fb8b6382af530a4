"""Parallelism and precision, kept out of the model (torchtitan style).

One process per device, launched by torchrun: DDP or FSDP2 across ranks (NCCL on GPUs, gloo on
CPUs), bf16 autocast on CUDA with fp32 master weights, optional activation checkpointing and
torch.compile. The model file knows none of this.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.train_config import TrainConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable value)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Read torchrun's environment and join the process group when there are several ranks."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    """Leave the process group together: a rank tearing gloo down while its peer is still
    writing a checkpoint was seen to abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        # Free model/optimizer objects kept alive by reference cycles now, while the group is
        # alive: freed later, during interpreter shutdown, gloo work they hold can abort.
        gc.collect()
        with contextlib.suppress(Exception):  # a failed peer must not hide the original error
            dist.barrier()
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def broadcast_bytes(data: bytes | None, env: DistEnv) -> bytes:
    """Rank 0's `data` on every rank (raw bytes: no pickle between ranks either)."""
    if not env.distributed:
        assert data is not None
        return data
    length = torch.tensor([len(data) if env.is_main else 0], dtype=torch.int64, device=env.device)
    dist.broadcast(length, src=0)
    buffer = torch.empty(int(length), dtype=torch.uint8, device=env.device)
    if env.is_main:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy())


def broadcast_tensors(tensors: dict[str, torch.Tensor], env: DistEnv) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank; the other ranks pass tensors of the right shapes and
    dtypes (e.g. fresh ones) to receive into."""
    if not env.distributed:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        on_device = tensor.to(env.device)
        dist.broadcast(on_device, src=0)
        out[name] = on_device.cpu()
    return out


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. bf16 needs no loss scaling, unlike fp16."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def parallelize(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """Apply activation checkpointing, torch.compile and DDP/FSDP2, in that order.

    Returns the module to call for forward/backward. Parameter names (FQNs) are unchanged by
    the composable APIs used here, so checkpoints stay interchangeable between modes.
    """
    if cfg.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.layers:
            checkpoint(block)
    if cfg.compile:
        for block in model.layers:
            block.compile()
    if not env.distributed:
        return model
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # Shard each block, then the root (embeddings, final norm, output head).
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 and the composable APIs do not wrap)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
