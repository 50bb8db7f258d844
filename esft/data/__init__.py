"""Data: records, tokenization, packing and the SFT DataModule."""

from esft.data.datamodule import SFTDataModule

__all__ = ["SFTDataModule"]
