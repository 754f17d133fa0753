"""Process group, parallel wrapping, activation checkpointing and compile, applied from outside
the model (torchtitan style): the model file knows nothing about any of them.

- ``init_distributed``: reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; gloo on CPU,
  nccl on CUDA; ``timeout_s`` (``train.dist_timeout``) bounds every collective, and a
  collective that times out raises :class:`DistTimeoutError` naming that key.
- ``LossModule``: ``forward(text, images) -> model.compute_losses(...)``, so DDP/FSDP hooks run
  around the whole two-pass step (they only hook ``forward``).
- ``apply_activation_checkpointing``: every shared transformer block recomputes its forward in
  backward (``torch.utils.checkpoint``, non-reentrant); parameter names do not change.
- ``apply_compile``: ``torch.compile`` each block in place.
- ``wrap_parallel``: DDP, or FSDP2 ``fully_shard`` per block then the root.
- ``to_device``: a micro-batch (nested dicts / lists / tuples of tensors) moved to the device.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.blocks import CrossAttentionBlock, ParallelBlock, TransformerBlock

log = logging.getLogger(__name__)

__all__ = [
    "DistInfo",
    "DistTimeoutError",
    "init_distributed",
    "collective",
    "shutdown_distributed",
    "LossModule",
    "transformer_blocks",
    "apply_activation_checkpointing",
    "apply_compile",
    "wrap_parallel",
    "all_reduce_mean",
    "sync_replicated_grads",
    "barrier",
    "all_ranks_ok",
    "broadcast_int",
    "to_device",
]

BLOCK_TYPES: tuple[type[nn.Module], ...] = (ParallelBlock, TransformerBlock, CrossAttentionBlock)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def to_device(batch: Any, device: torch.device | str, *, non_blocking: bool = True) -> Any:
    """``batch`` with every tensor moved to ``device``, however nested in dicts, lists and tuples
    (e.g. ``{"images": ..., "boxes": [a tensor per image]}``). Other values (ints, strings,
    None) are kept; mappings come back as dicts, lists as lists, tuples (namedtuples too) as
    their own type.

    A small recursive function rather than ``torch.utils._pytree.tree_map``: that module is
    private (its name and rules may change between torch releases), and a batch holds only
    these three kinds of container."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device, non_blocking=non_blocking) for v in batch]
    if isinstance(batch, tuple):
        items = [to_device(v, device, non_blocking=non_blocking) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


class DistTimeoutError(TimeoutError):
    """A collective (or joining the process group) did not complete within ``train.dist_timeout``:
    another rank is hung, died, or is much slower. An ``OSError`` (``TimeoutError``) subclass."""


_TIMEOUT_S: float | None = None  # the process group's timeout, for the messages
_TIMEOUT_WORDS = re.compile(r"timed?[ _-]?out|timeout", re.IGNORECASE)


def _timeout_error(what: str, exc: BaseException) -> DistTimeoutError:
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    limit = f"train.dist_timeout={_TIMEOUT_S:g} s" if _TIMEOUT_S is not None else "the process group's timeout"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return DistTimeoutError(
        f"rank {rank}: {what} did not complete within {limit}: another rank is hung, died or is far slower "
        f"(torch: {first}). If steps or checkpoint saves legitimately take longer, raise train.dist_timeout.")


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn torch's timeout error inside the block (e.g. gloo's "Timed out waiting 3000ms for
    recv operation") into a :class:`DistTimeoutError` naming ``train.dist_timeout``; other
    errors pass unchanged."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError / DistStoreError are RuntimeErrors
        if _TIMEOUT_WORDS.search(str(exc)):
            raise _timeout_error(what, exc) from exc
        raise


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    ``timeout_s`` (``train.dist_timeout``): how long joining and every later collective may
    wait for the other ranks before failing (``None``: torch's default)."""
    global _TIMEOUT_S
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: expected a usable device, got 'cuda' but CUDA is not available")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"train.dist_timeout: expected a positive number of seconds, got {timeout_s!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        _TIMEOUT_S = timeout_s
        with collective(f"joining the process group ({world} ranks)"):
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)
        log.info("rank %d/%d joined the process group (%s, collective timeout %s)", rank, world, dist.get_backend(),
                 f"{timeout_s:g} s" if timeout_s is not None else "torch default")
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(what: str = "a barrier") -> None:
    if _initialized():
        with collective(what):
            dist.barrier()


def all_ranks_ok(ok: bool, what: str = "agreeing on an outcome") -> bool:
    """True when ``ok`` is true on every rank (one small all-reduce; ``ok`` on one process).
    Every rank must call it: a rank that failed says so instead of leaving the others waiting."""
    if not _initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_flag_device())
    with collective(what):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_int(value: int, what: str = "a broadcast") -> int:
    """Rank 0's ``value`` on every rank (identity on one process)."""
    if not _initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_flag_device())
    with collective(what):
        dist.broadcast(t, src=0)
    return int(t.item())


def sync_replicated_grads(module: nn.Module) -> None:
    """Average the gradients of parameters FSDP left replicated (see ``wrap_parallel``)."""
    params = getattr(module, "replicated_params", ())
    if not params or not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.stack([g.reshape(()) for g in grads])
    with collective("averaging replicated gradients"):
        dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat):
        p.grad = g.reshape(p.shape).clone()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place on a copy); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    y = x.clone()
    with collective("an all-reduce"):
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


class LossModule(nn.Module):
    """``forward(batch) -> task.loss(model, batch)`` (named losses), so DDP/FSDP hooks run
    around the whole objective (they only hook ``forward``)."""

    def __init__(self, model: nn.Module, task: Any) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.task.loss(self.model, batch)


def transformer_blocks(model: nn.Module, block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> list[nn.Module]:
    """The blocks of ``block_types`` inside ``model`` (outermost only), in module order. The
    Trainer passes the model's registry spec (``ModelSpec.block_types``)."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, block_types) and id(module) not in seen:
            found.append(module)
            seen.update(id(m) for m in module.modules())
    return found


def _checkpointed(forward):
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or kwargs.get("cache") is not None:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> int:
    """Recompute every block's activations in backward; returns how many blocks."""
    blocks = transformer_blocks(model, block_types)
    for block in blocks:
        block.forward = _checkpointed(block.forward)  # instance attribute: names unchanged
    log.info("activation checkpointing on %d blocks", len(blocks))
    return len(blocks)


def apply_compile(model: nn.Module, block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> int:
    """``torch.compile`` each block in place (parameter names unchanged); returns how many."""
    blocks = transformer_blocks(model, block_types)
    for block in blocks:
        block.compile()
    log.info("torch.compile on %d blocks", len(blocks))
    return len(blocks)


def wrap_parallel(module: LossModule, mode: str, info: DistInfo,
                  block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> nn.Module:
    """Wrap for data parallelism: ``"none"``, ``"ddp"`` or ``"fsdp"`` (FSDP2 per block + root)."""
    if mode == "none" or not info.distributed:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=module.task.unused_parameters)
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        # FSDP2 cannot shard 0-d parameters (learnable temperatures): keep them replicated
        # and average their gradients by hand (sync_replicated_grads)
        scalars = {p for p in module.parameters() if p.ndim == 0}
        blocks = transformer_blocks(module, block_types)
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh, ignored_params=scalars or None)
        module.replicated_params = sorted(scalars, key=id)
        log.info("FSDP2: %d blocks sharded over %d ranks", len(blocks), info.world_size)
        return module
    raise ValueError(f"train.parallel: expected 'none', 'ddp' or 'fsdp', got {mode!r}")
