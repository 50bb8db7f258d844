"""One LightningModule per objective."""

from esft.objectives.base import CausalLMModule
from esft.objectives.grpo import GRPOModule
from esft.objectives.sft import SFTModule
from esft.objectives.distill import DistillModule
from esft.objectives.preference import PreferenceModule
from esft.objectives.reward import RewardModule

__all__ = ["CausalLMModule", "DistillModule", "GRPOModule", "PreferenceModule", "RewardModule", "SFTModule"]
