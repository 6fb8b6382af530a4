"""Parallelism and precision, kept out of the model (torchtitan style).

One process per device, launched by torchrun on one host or several: DDP or FSDP2 across ranks
(NCCL on GPUs, gloo on CPUs), bf16 autocast on CUDA with fp32 master weights, optional activation
checkpointing and torch.compile. The model file knows none of this.

Several hosts share nothing but the rendezvous: global rank 0 alone reads and writes the shared
state (checkpoints, logs, the network) and broadcasts what the others need; the first rank of
each host (local rank 0) keeps that host's own shard cache.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.train_config import TrainConfig


class LaunchError(ValueError):
    """Bad multi-rank launch options, or hosts started with different settings or data."""


# HOST:PORT, with an IPv6 address in brackets ([::1]:29500) as torchrun writes it.
ENDPOINT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Launch:
    """How many ranks take part and where they meet; torchrun's own option names (each field is
    also a flag of `fedpt train` and `fedpt node join`, and a key of node.toml's [node])."""

    nproc_per_node: int = field(default=1, metadata={"help": "ranks on this host (torchrun)"})
    nnodes: int = field(default=1, metadata={"help": "hosts taking part (torchrun)"})
    node_rank: int | None = field(
        default=None,
        metadata={"help": "this host's index, 0..nnodes-1; host 0 holds global rank 0"},
    )
    rdzv_endpoint: str = field(
        default="", metadata={"help": "HOST:PORT on the host with node rank 0, where hosts meet"}
    )

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise LaunchError("--nproc-per-node must be at least 1")
        if self.nnodes < 1:
            raise LaunchError(f"--nnodes must be at least 1, got {self.nnodes}")
        if self.nnodes == 1:
            if self.node_rank is not None or self.rdzv_endpoint:
                raise LaunchError("--node-rank and --rdzv-endpoint need --nnodes greater than 1")
            return
        if self.node_rank is None or not self.rdzv_endpoint:
            # No defaults: two hosts that both took node rank 0 would both claim global rank 0.
            raise LaunchError(
                f"--nnodes {self.nnodes} needs this host's --node-rank and the --rdzv-endpoint "
                "HOST:PORT of the host with node rank 0"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise LaunchError(
                f"--node-rank must be in 0..{self.nnodes - 1} for --nnodes {self.nnodes}, "
                f"got {self.node_rank}"
            )
        match = ENDPOINT.fullmatch(self.rdzv_endpoint)
        if match is None or not 1 <= int(match["port"]) <= 65535:
            raise LaunchError(
                f"--rdzv-endpoint must be HOST:PORT with a port in 1..65535 ([ADDRESS]:PORT for "
                f"IPv6), got {self.rdzv_endpoint!r}"
            )

    @property
    def ranks(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_args(self) -> list[str]:
        """torchrun's options for this launch."""
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc_per_node}"]
        # Static rendezvous: the TCP store lives on host 0 at the endpoint, and node rank r
        # holds global ranks r·nproc … r·nproc+nproc−1, so host 0 is the one that talks to the
        # network. (c10d rendezvous would order hosts by arrival and ignore --node-rank.)
        return [
            f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=static",
            f"--rdzv-endpoint={self.rdzv_endpoint}", f"--nproc-per-node={self.nproc_per_node}",
        ]  # fmt: skip


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 (immutable value)

    @property
    def is_main(self) -> bool:
        """Global rank 0, on host 0: the only rank that does network I/O or writes shared state."""
        return self.rank == 0

    @property
    def is_host_main(self) -> bool:
        """The first rank on this host: does what each host must do once (its shard cache)."""
        return self.local_rank == 0

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


def broadcast_json(value: Any, env: DistEnv) -> Any:
    """Rank 0's JSON value on every rank."""
    return json.loads(broadcast_bytes(json.dumps(value).encode() if env.is_main else None, env))


def decided_by_main(
    compute: Callable[[], Any], env: DistEnv, errors: tuple[type[Exception], ...] = ()
) -> Any:
    """`compute()` run on rank 0 alone, its JSON result on every rank: only rank 0 reads its
    disk, so other hosts need not share it. One of `errors` raised there is raised on every
    rank (same class and message), so no rank is left waiting in a collective."""
    result, failure, kind = None, None, -1
    if env.is_main:
        try:
            result = compute()
        except errors as e:
            failure, kind = e, next(i for i, c in enumerate(errors) if isinstance(e, c))
    payload = broadcast_json({"result": result, "error": [kind, str(failure)]}, env)
    if failure is not None:
        raise failure
    if payload["error"][0] >= 0:
        raise errors[payload["error"][0]](payload["error"][1])
    return payload["result"]


def check_same_everywhere(what: str, value: Any, env: DistEnv) -> None:
    """Raise LaunchError on every rank unless all ranks hold an equal JSON `value`: a host
    started with other settings or data would train something else, or hang in a collective."""
    if not env.distributed:
        return
    mine = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    differs = broadcast_json(mine, env) != mine
    flag = torch.tensor([int(differs)], dtype=torch.int64, device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag):
        here = "this rank's differ from rank 0's" if differs else "some other rank's differ"
        raise LaunchError(
            f"the ranks disagree on {what} ({here}): start every host with the same settings "
            f"and the same data (rank {env.rank})"
        )


def broadcast_state(
    tensors: dict[str, torch.Tensor] | None, env: DistEnv
) -> dict[str, torch.Tensor]:
    """Rank 0's named tensors on every rank; the others pass None. Names, shapes and dtypes
    travel first, so the other ranks need not know them (e.g. a checkpoint only rank 0 read)."""
    specs = broadcast_json(
        [[n, list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()]
        if env.is_main
        else None,
        env,
    )
    if not env.is_main:
        tensors = {n: torch.empty(shape, dtype=getattr(torch, dtype)) for n, shape, dtype in specs}
    return broadcast_tensors(tensors, env)


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
