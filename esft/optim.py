"""Optimizers, parameter groups and learning-rate schedules: what `CausalLMModule.configure_optimizers`
builds from `OptimConfig` (``model.init_args.optim`` in YAML).

    esft fit --config configs/sft/quickstart.yaml --model.init_args.optim.optimizer muon \\
        --model.init_args.optim.schedule wsd

Optimizers (``optimizer``):

- ``adamw``: `torch.optim.AdamW`, fused where the parameters' device supports it.
- ``muon``: `torch.optim.Muon` (Jordan et al. 2024, "Muon: an optimizer for hidden layers") on
  the 2-D hidden weight matrices, AdamW on everything else (embeddings, LM head, norms, biases,
  and 3-D fused MoE expert tensors, which Muon does not take). The two run as ONE optimizer,
  `MuonWithAdamW`, so Lightning's automatic optimization, gradient clipping, gradient
  accumulation, the LR scheduler and checkpoint/resume work unchanged (two optimizers would
  need manual optimization, where Lightning refuses ``gradient_clip_val`` and every objective
  would need its own stepping code). Muon's update is rescaled with ``match_rms_adamw`` by
  default (Liu et al. 2025, "Muon is Scalable for LLM Training"), so one peak LR and weight
  decay serve both halves; ``muon_lr`` sets its own.
- ``adafactor``: `torch.optim.Adafactor` (Shazeer & Stern 2018): factored second moments, no
  first moment, so its state is O(rows + cols) per matrix. Its ``lr`` is the ceiling of the
  relative step size (torch's default 1e-2), not an absolute step.
- ``lion``: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") from the
  ``lion-pytorch`` package (``pip install esft[lion]``): one momentum buffer, sign updates; the
  paper uses an LR 3-10x smaller and a weight decay 3-10x larger than AdamW's, and betas
  (0.9, 0.99).
- ``adamw8bit``: bitsandbytes' 8-bit AdamW (Dettmers et al. 2022), CUDA only
  (``pip install bitsandbytes``).

Parameter groups: weight decay on matrices only (never on biases and norms; on embeddings and
the LM head only with ``decay_embeddings``), and per-group LR multipliers chosen by glob
patterns over parameter names (``lr_multipliers: {"*embed_tokens*": 0.1}``; first match wins).
Only trainable parameters are grouped, so frozen ones get no optimizer state.

Schedules (``schedule``), all with linear warmup from 0 over ``warmup_steps`` (or
``warmup_ratio`` of the run), ending at ``min_lr_ratio`` of the peak: ``cosine``, ``linear``,
``constant`` (holds the peak after warmup; ``min_lr_ratio`` unused) and ``wsd``
(warmup-stable-decay: the peak until the last ``decay_ratio`` of the steps, then a ``linear``,
``cosine`` or ``sqrt`` decay, where ``sqrt`` is the "1 - sqrt" cooldown of Hägele et al. 2024,
"Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations"; WSD itself is from
Hu et al. 2024, MiniCPM). A group's LR is its peak times the schedule's factor.

The regularization fields (``dropout``, ``neftune_alpha``, ``label_smoothing``) live here too so
that an ablation is one YAML block; `esft.regularization` applies the first two to the model and
the loss reads the third.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

OptimizerName = Literal["adamw", "muon", "adafactor", "lion", "adamw8bit"]
ScheduleName = Literal["cosine", "linear", "constant", "wsd"]
DecayShape = Literal["linear", "cosine", "sqrt"]


@dataclass
class OptimConfig:
    """Optimizer, parameter groups, LR schedule and regularization of a run."""

    optimizer: OptimizerName = "adamw"
    """``adamw``, ``muon`` (Muon on hidden matrices + AdamW), ``adafactor``, ``lion`` or ``adamw8bit``."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (never on biases and norms)."""
    decay_embeddings: bool = False
    """Also decay the embedding and LM-head matrices."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (AdamW, the AdamW half of Muon, 8-bit AdamW); Lion's (beta1, beta2)."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps (wins over `warmup_ratio`)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of the run's optimizer steps, when `warmup_steps` is 0."""
    min_lr_ratio: float = 0.1
    """The schedule ends at ``lr * min_lr_ratio`` at the last step (not used by ``constant``)."""
    fused: bool | None = None
    """Fused AdamW kernel; None uses it where the parameters' device supports it."""
    schedule: ScheduleName = "cosine"
    """After warmup: ``cosine``, ``linear`` or ``wsd`` decay to `min_lr_ratio`, or ``constant``."""
    decay_ratio: float = 0.2
    """WSD: fraction of the run's steps spent in the final decay."""
    decay_shape: DecayShape = "sqrt"
    """WSD: shape of the final decay: ``linear``, ``cosine`` or ``sqrt`` (1 - sqrt(progress))."""
    lr_multipliers: dict[str, float] | None = None
    """Glob pattern over parameter names -> LR multiplier (first matching pattern wins)."""
    muon_lr: float | None = None
    """Peak LR of Muon's matrices; None: `lr` (with ``match_rms_adamw`` scaling that is the intent)."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum."""
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = "match_rms_adamw"
    """Muon's per-matrix LR scaling: Keller Jordan's ``original`` or Moonlight's ``match_rms_adamw``."""
    dropout: float | None = None
    """Sets every dropout probability of the model (config fields and modules); None keeps the model's."""
    neftune_alpha: float = 0.0
    """NEFTune noise scale on the input embeddings in training (Jain et al. 2023 use 5-15); 0 = off."""
    label_smoothing: float = 0.0
    """Label smoothing of the training cross-entropy (validation loss stays plain); 0 = off."""

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (0 < self.decay_ratio <= 1, f"decay_ratio must be in (0, 1], got {self.decay_ratio}"),
            (self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.neftune_alpha >= 0, f"neftune_alpha must be >= 0, got {self.neftune_alpha}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model.init_args.optim: {message}")
        for pattern, mult in (self.lr_multipliers or {}).items():
            if not isinstance(mult, (int, float)) or mult < 0:
                raise ValueError(f"model.init_args.optim.lr_multipliers[{pattern!r}] must be a number >= 0, got {mult!r}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps` optimizer steps."""
        return self.warmup_steps or int(self.warmup_ratio * total_steps)


# ---- parameter groups ------------------------------------------------------------------------
def _embedding_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        ids.add(id(head.weight))
    return ids


def grouped_parameters(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups for `cfg`, in a fixed order, empty groups left out.

    Each group has ``params``, ``weight_decay``, ``lr`` (peak LR times its multiplier) and the
    bookkeeping keys ``group`` (a readable name such as ``muon/decay``, ``decay`` or ``no_decay*0.1``,
    unique: a second group of the same name, from another pattern with the same multiplier, gets
    ``#2``), ``muon`` (routed to Muon) and ``lr_mult``. With the defaults there are two groups:
    decayed matrices, then undecayed biases, norms and embeddings. The training log shows each
    group's LR as ``train/lr/<group>`` (`group_learning_rates`).
    """
    embeddings = _embedding_ids(model)
    patterns = list((cfg.lr_multipliers or {}).items())
    used = set()
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = id(p) in embeddings
        no_decay = p.ndim < 2 or (is_embedding and not cfg.decay_embeddings)
        muon = cfg.optimizer == "muon" and p.ndim == 2 and not is_embedding
        rank = next((i for i, (pattern, _) in enumerate(patterns) if fnmatch.fnmatchcase(name, pattern)), -1)
        if rank >= 0:
            used.add(rank)
        buckets.setdefault((0 if muon else 1, no_decay, rank), []).append(p)  # Muon's groups first
    unused = [patterns[i][0] for i in range(len(patterns)) if i not in used]
    if unused:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(f"model.init_args.optim.lr_multipliers: {unused} match no trainable parameter "
                         f"(names look like {names[:4]} ...)")
    groups, seen = [], {}
    for (order, no_decay, rank), params in sorted(buckets.items()):
        muon = order == 0
        mult = float(patterns[rank][1]) if rank >= 0 else 1.0
        peak = cfg.muon_lr if muon and cfg.muon_lr is not None else cfg.lr
        name = ("muon/" if muon else "") + ("no_decay" if no_decay else "decay") + (f"*{mult:g}" if rank >= 0 else "")
        seen[name] = seen.get(name, 0) + 1
        groups.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                       "lr": peak * mult, "lr_mult": mult, "muon": muon,
                       "group": name if seen[name] == 1 else f"{name}#{seen[name]}"})
    if not groups:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    return groups


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rate each parameter group steps with now, by group name (``group`` of
    `grouped_parameters`; ``pg<i>`` for a group without one, e.g. an optimizer built elsewhere)."""
    return {str(g.get("group", f"pg{i}")): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases / norms (1-D) / optionally embeddings."""
    cfg = OptimConfig(weight_decay=weight_decay, decay_embeddings=decay_embeddings)
    groups = {g["group"]: g["params"] for g in grouped_parameters(model, cfg)}
    return [{"params": groups.get("decay", []), "weight_decay": weight_decay},
            {"params": groups.get("no_decay", []), "weight_decay": 0.0}]


# ---- optimizers ------------------------------------------------------------------------------
def _fused_supported(params: list[torch.Tensor]) -> bool:
    return all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the groups marked ``muon``, AdamW on the others, as one optimizer.

    ``param_groups`` are the inner optimizers' own group dicts, so an LR scheduler, Lightning's
    gradient clipping and the per-group LR log (`group_learning_rates`) act on both;
    ``state_dict`` holds both inner state dicts, and loading it re-links the groups.
    """

    def __init__(self, groups: list[dict[str, Any]], betas: tuple[float, float], eps: float,
                 momentum: float, adjust_lr_fn: str, fused: bool | None) -> None:
        muon = [g for g in groups if g["muon"]]
        adam = [g for g in groups if not g["muon"]]
        if not muon:
            raise ValueError("optimizer 'muon' found no trainable 2-D hidden matrix to optimize")
        self.muon = torch.optim.Muon(muon, lr=muon[0]["lr"], momentum=momentum, adjust_lr_fn=adjust_lr_fn)
        self.optimizers: list[torch.optim.Optimizer] = [self.muon]
        if adam:
            params = [p for g in adam for p in g["params"]]
            use_fused = _fused_supported(params) if fused is None else fused
            self.optimizers.append(torch.optim.AdamW(adam, lr=adam[0]["lr"], betas=tuple(betas), eps=eps, fused=use_fused))
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})

    @property
    def state(self) -> dict:  # type: ignore[override]
        """Per-parameter state of both inner optimizers (the dicts themselves, not copies)."""
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value) -> None:
        if value:  # Optimizer.__init__ assigns an empty mapping; the real state lives in the inner optimizers
            raise AttributeError("MuonWithAdamW's state belongs to its inner optimizers; use load_state_dict")

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers")
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ValueError(f"MuonWithAdamW.load_state_dict: expected {len(self.optimizers)} inner optimizer states "
                             f"(a checkpoint of optimizer 'muon' with the same parameter groups)")
        for optimizer, sd in zip(self.optimizers, inner):
            optimizer.load_state_dict(sd)
        # load_state_dict gives the inner optimizers new group dicts: share them again
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over `grouped_parameters(model, cfg)`."""
    groups = grouped_parameters(model, cfg)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "adamw":
        fused = _fused_supported(params) if cfg.fused is None else cfg.fused
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
    if cfg.optimizer == "muon":
        return MuonWithAdamW(groups, cfg.betas, cfg.eps, cfg.muon_momentum, cfg.muon_adjust_lr, cfg.fused)
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    if cfg.optimizer == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError as e:
            raise ModuleNotFoundError("optimizer 'lion' needs lion-pytorch: pip install lion-pytorch (or esft[lion])") from e
        return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw8bit":
        devices = sorted({p.device.type for p in params})
        if devices != ["cuda"]:
            raise RuntimeError(f"optimizer 'adamw8bit' (bitsandbytes) runs on CUDA only; the parameters are on {devices}: "
                               "use optimizer 'adamw' or 'adafactor' here")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ModuleNotFoundError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"model.init_args.optim.optimizer: unknown optimizer {cfg.optimizer!r}")


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the groups of `cfg` (whatever `cfg.optimizer` says)."""
    return build_optimizer(model, OptimConfig(**{**cfg.__dict__, "optimizer": "adamw"}))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, momentum buffers, factored stats)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif hasattr(value, "nbytes"):  # bitsandbytes' quantisation state
                total += int(value.nbytes)
    return total


# ---- schedules -------------------------------------------------------------------------------
def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, schedule: ScheduleName = "cosine",
              min_lr_ratio: float = 0.1, decay_ratio: float = 0.2, decay_shape: DecayShape = "sqrt") -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based) of a `total_steps` run.

    Warmup: ``(step + 1) / warmup_steps`` for the first `warmup_steps` steps. Then ``progress``
    runs from 0 to 1 over the remaining steps and the factor goes from 1 to `min_lr_ratio`:
    cosine ``m + (1 - m)(1 + cos(pi p)) / 2``, linear ``1 - (1 - m) p``, constant 1; WSD holds 1
    until the last ``decay_ratio * total_steps`` steps and decays over them with `decay_shape`
    (``sqrt``: ``1 - (1 - m) sqrt(p)``). Steps past `total_steps` keep the final value.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    m = min_lr_ratio
    if schedule == "wsd":
        decay_steps = max(1, round(decay_ratio * total_steps))
        start = max(warmup_steps, total_steps - decay_steps)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, total_steps - start))
        shape = decay_shape
    else:
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = schedule
    if shape == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return 1 - (1 - m) * progress
    if shape == "sqrt":
        return 1 - (1 - m) * math.sqrt(progress)
    raise ValueError(f"unknown schedule shape {shape!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """`lr_factor` under `cfg` as a per-step LambdaLR (every group scaled by the same factor)."""
    warmup = cfg.warmup_for(total_steps)
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.schedule, cfg.min_lr_ratio,
                                                      cfg.decay_ratio, cfg.decay_shape))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at `total_steps`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, "cosine", min_lr_ratio))
