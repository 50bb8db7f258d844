"""Data: records, tokenization, packing and the SFT DataModule."""

from esft.data.datamodule import SFTDataModule
from esft.data.distill import DistillDataModule
from esft.data.preference import PreferenceDataModule
from esft.data.prompts import PromptDataModule

__all__ = ["DistillDataModule", "PreferenceDataModule", "PromptDataModule", "SFTDataModule"]
