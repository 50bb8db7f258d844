"""A frozen second model beside the trained one: a preference or GRPO reference, a distillation teacher.

`FrozenModel` keeps the model out of the LightningModule's registered submodules, so it stays out
of the optimizer, the checkpoint, ``train()`` / ``eval()`` switches and Lightning's device moves. It
is moved to the policy's device on first use, sharded like the policy under FSDP2 (`shard`), run
under ``no_grad`` through `esft.models.sharding.call_model` (so a sharded model gathers its weights
for the call), and uses the policy's attention implementation (`match_attention`).

With LoRA the reference of a preference or RL objective needs no copy at all: `FrozenModel.base_of`
runs the policy itself with its adapters disabled (peft's ``disable_adapter``), which is the
starting model as long as the base weights are frozen (they are, under `esft.models.lora`).
Under DDP and DeepSpeed (ZeRO-2 and -3) a copied or loaded frozen model is whole on every rank.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from esft.models.sharding import call_model, is_sharded, shard_fsdp2


class FrozenModel:
    """A frozen model (or the adapter-free base of a LoRA policy) that objectives call under ``no_grad``."""

    def __init__(self, model: nn.Module, base_of_adapter: bool = False) -> None:
        """
        Args:
            model: the frozen model; with `base_of_adapter`, the peft-wrapped policy itself.
            base_of_adapter: call `model` with its LoRA adapters disabled instead of a copy.
        """
        self._model = (model,)  # a tuple: never registered as a submodule of the owner
        self.base_of_adapter = base_of_adapter
        if not base_of_adapter:
            model.requires_grad_(False).eval()

    @classmethod
    def copy_of(cls, policy: nn.Module) -> "FrozenModel":
        """A frozen copy of `policy` as it is now (call it before any strategy shards the policy)."""
        if is_sharded(policy):
            raise ValueError("a frozen copy must be made before the policy is sharded (in configure_model, first)")
        return cls(copy.deepcopy(policy))

    @classmethod
    def base_of(cls, policy: nn.Module) -> "FrozenModel":
        """The policy's base model: the LoRA-wrapped `policy` run with its adapters disabled."""
        if not hasattr(policy, "disable_adapter"):
            raise ValueError("FrozenModel.base_of needs a LoRA (peft) model")
        return cls(policy, base_of_adapter=True)

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def shard(self, mesh) -> None:
        """FSDP2: shard like the policy (per decoder layer, then the root) over `mesh`, once."""
        if not self.base_of_adapter and mesh is not None and not is_sharded(self.model):
            shard_fsdp2(self.model, mesh)

    def to(self, device: torch.device) -> "FrozenModel":
        """Move an unsharded frozen model to `device` (a no-op where it already is)."""
        model = self.model
        if not self.base_of_adapter and not is_sharded(model):
            param = next(model.parameters(), None)
            if param is not None and param.device != torch.device(device):
                model.to(device)
        return self

    def match_attention(self, policy: nn.Module) -> None:
        """Use the policy's attention implementation (the same packed layout then fits both)."""
        attn = policy.config._attn_implementation
        if not self.base_of_adapter and self.model.config._attn_implementation != attn:
            self.model.set_attn_implementation(attn)

    @torch.no_grad()
    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` under ``no_grad`` (and with the adapters disabled for `base_of`)."""
        model = self.model
        if not self.base_of_adapter:
            return call_model(model, fn, *args, **kwargs)
        training = model.training
        model.eval()  # the reference runs without dropout, as a frozen copy would
        try:
            with model.disable_adapter():
                return call_model(model, fn, *args, **kwargs)
        finally:
            model.train(training)
