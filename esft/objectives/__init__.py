"""One LightningModule per objective."""

from esft.objectives.base import CausalLMModule
from esft.objectives.grpo import GRPOModule
from esft.objectives.sft import SFTModule

__all__ = ["CausalLMModule", "GRPOModule", "SFTModule"]
