"""Data: records, tokenization, packing and the SFT DataModule."""

from esft.data.datamodule import SFTDataModule
from esft.data.distill import DistillDataModule

__all__ = ["SFTDataModule", "DistillDataModule"]
