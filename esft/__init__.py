"""ESFT: efficient supervised fine-tuning of causal language models on Lightning."""

__version__ = "0.1.0"
