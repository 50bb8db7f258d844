"""FSDP2 sharding of a causal LM, and calling a sharded model outside its ``forward``.

The objectives compute their losses from the decoder's hidden states and the LM head's weight
(chunked cross-entropy, log-probs, KD), not through ``model.forward``. FSDP2 gathers a module's
parameters only around its forward (and the methods registered as forward methods), so every such
computation runs as ``call_model(model, fn, ...)``: on a sharded model it becomes one forward of
the root, with its parameters gathered for it and their gradients reduce-scattered afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method


def _apply(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(model, *args, **kwargs)


def shard_fsdp2(model: torch.nn.Module, mesh, compile: bool = False) -> None:
    """``fully_shard`` every decoder layer, then the root, over the 1-D data-parallel `mesh`.
    The root gets ``esft_apply`` (see `call_model`) and ``generate`` as FSDP forward methods;
    `compile` compiles each layer after sharding (compiling first would trace the unsharded
    parameters). Frozen models (a distillation teacher, a GRPO reference) are sharded the same way."""
    layers = model.get_decoder().layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.esft_apply = partial(_apply, model)
    register_fsdp_forward_method(model, "esft_apply")
    if hasattr(model, "generate"):  # not a reward model (a sequence classifier)
        register_fsdp_forward_method(model, "generate")  # evaluation, RL rollouts, on-policy distillation
    if compile:
        for layer in layers:
            layer.compile()


def call_model(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(model, *args, **kwargs)``; on a sharded model (`shard_fsdp2`, or partitioned by
    DeepSpeed ZeRO-3), inside one forward of its root. Tensors `fn` takes from the root's
    parameters are valid during the call only."""
    apply = getattr(model, "esft_apply", None)
    if apply is not None:
        return apply(fn, *args, **kwargs)
    if _zero3(model):
        return _zero3_call(model, fn, *args, **kwargs)
    return fn(model, *args, **kwargs)


def _partitioned(p: torch.Tensor | None) -> bool:
    return p is not None and hasattr(p, "ds_id")  # a DeepSpeed ZeRO-3 parameter


def _zero3(model: torch.nn.Module) -> bool:
    return _partitioned(next(model.parameters(), None))


def _zero3_call(model: torch.nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """ZeRO-3 gathers a module's parameters around its own forward (and backward) only, and `fn`
    uses the LM head's weight outside the head's forward: register it as an external parameter
    of the root and run `fn` as the root's forward, so ZeRO-3's hooks gather it for the call and
    reduce-scatter its gradient."""
    import deepspeed

    if not getattr(model, "_esft_zero3_head", False):
        head = model.get_output_embeddings()  # None for a reward model: its score head runs its own forward
        for p in [] if head is None else head.parameters():
            deepspeed.zero.register_external_parameter(model, p)
        model._esft_zero3_head = True
    model.forward = partial(fn, model)  # shadows the class's forward for this one call
    try:
        return model(*args, **kwargs)
    finally:
        del model.forward


@contextmanager
def gathered(params: list[torch.nn.Parameter]):
    """Within the block, ZeRO-3 partitioned `params` hold their whole data (read-only; copy what
    must outlive it); other parameters are left alone. FSDP2 shards gather with ``full_tensor()``."""
    if params and _partitioned(params[0]):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether every rank holds only a shard of the weights (FSDP2, DeepSpeed ZeRO-3), so a
    forward pass is a collective that every rank must take part in."""
    return isinstance(model, FSDPModule) or _zero3(model)


def synced_generation(model: torch.nn.Module) -> bool:
    """Whether generation must keep every rank stepping until all are done (HF's
    ``synced_gpus``): a sharded model gathers weights in every decoding step, and ranks whose
    samples end early would otherwise stop joining those gathers (and the run fails or hangs).
    transformers turns it on by itself for FSDP2 modules, but does not see a ZeRO-3 model that
    Lightning's `DeepSpeedStrategy` partitioned, so `esft.evaluation.rollout` sets it explicitly."""
    return is_sharded(model) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
