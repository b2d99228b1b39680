"""Data-parallel (DDP) and sharded (FSDP2) training, and checkpoints any process count can read.

``vitkit train`` stays one loop; this module is what changes with ``--strategy``:

- ``wrap_model``: DDP replicates the model on every rank and all-reduces the gradients;
  FSDP2 (``fully_shard``) shards each encoder block, then the root (patch embedding, head),
  so a rank holds 1/world_size of the parameters, gradients and Adam moments.
- ``no_sync``: skip the gradient reduction on the micro-batches before the last one.
- ``full_model`` / ``full_optimizer_state``: gather a sharded model and its optimizer into
  the single-process formats (``model.safetensors``, ``optimizer.state_dict()``) on rank 0,
  so a checkpoint of an FSDP run loads in one process, and the other way round
  (``load_model_state`` / ``load_optimizer_state``).
- ``is_elastic_restart``: a group that torchrun restarted after a worker failure
  (``--max-restarts``) resumes from ``last/`` instead of refusing the run folder.

FSDP2 runs on gloo (CPU) as well as NCCL in torch 2.x; the tests use gloo.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, strategy: str, dist, device: torch.device) -> nn.Module:
    """The module the training step calls: ``model`` itself (one process), DDP, or ``model`` sharded in place."""
    if not dist.distributed:
        return model  # one process: nothing to reduce or shard (a single-process --strategy fsdp is plain training)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and FSDP's default device mesh use the current device: this rank's GPU
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per block: a block's parameters are all-gathered just before its forward (and
        # backward) and freed after, so at most one block is unsharded at a time. The root unit holds the
        # rest (patch embedding, class token, positions, norms, head).
        for block in model.encoder.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    # A one-channel patch convolution (digits, Fashion-MNIST) gets its weight's gradient with strides that
    # differ from the weight's only along its size-1 channel axis: the same memory order, so DDP's copy into
    # its bucket costs nothing extra, but DDP warns on every rank. Only that case is silenced.
    warnings.filterwarnings("ignore", message=r"(?s)Grad strides do not match bucket view strides.*"
                            r"grad\.sizes\(\) = \[\d+, 1, ", category=UserWarning)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(module: nn.Module, sync: bool):
    """Within: backward accumulates local gradients without reducing them (when ``sync`` is false)."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if is_fsdp(module):
        return _fsdp_no_sync(module)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module: nn.Module):
    module.set_requires_gradient_sync(False)  # recursive: every block keeps its unsharded gradient
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


# --- checkpoints: one format for every process count ---------------------------------------------
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model(model: nn.Module, rank: int) -> nn.Module | None:
    """A plain, unsharded copy of ``model`` on CPU on rank 0 (None elsewhere); ``model`` itself when not sharded.

    Collective under FSDP: every rank must call it (each contributes its shards to the all-gather).
    """
    if not is_fsdp(model):
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from .model import ViT

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))  # {} on ranks > 0
    if rank != 0:
        return None
    with torch.device("meta"):
        plain = ViT(model.cfg)  # no memory until the gathered tensors are assigned
    plain.load_state_dict(state, assign=True)
    plain.train(model.training)
    return plain


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict | None:
    """``optimizer.state_dict()`` as one process would write it (parameters numbered in group order).

    Under FSDP the moments are gathered to rank 0 (None elsewhere; collective), then renumbered from
    parameter names to the indices ``torch.optim.Optimizer.state_dict`` uses.
    """
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if rank != 0:
        return None
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: state for name, state in named["state"].items()},
        "param_groups": [dict(g, params=[index[name] for name in g["params"]]) for g in named["param_groups"]],
    }


def load_model_state(model: nn.Module, state: dict, rank: int) -> None:
    """Load a full (single-process) state dict; under FSDP rank 0 scatters the shards (collective)."""
    if not is_fsdp(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    options = _full_options(strict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, state if rank == 0 else {}, options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, rank: int) -> None:
    """Load a single-process ``optimizer.state_dict()``; under FSDP rank 0 scatters the shards (collective)."""
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
    }
    # broadcast_from_rank0: full tensors are read on rank 0 only and sent as shards (the other ranks pass {})
    set_optimizer_state_dict(model, optimizer, named if rank == 0 else {},
                             options=_full_options(broadcast_from_rank0=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every optimizer parameter, in the order ``optimizer.state_dict()`` numbers them."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


# --- elastic restarts ----------------------------------------------------------------------------
def is_elastic_restart() -> bool:
    """True in a worker group that torchrun started again after a failure (``--max-restarts``).

    torchrun restarts every worker of the group; the new ones resume from the run's ``last/``.
    The run-folder lock does not stand in the way: it is an ``fcntl.flock`` that died with the
    old rank 0.
    """
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
