"""Per-record quantities from a causal LM over packed batches: the mean next-token loss of each
record's trained tokens (perplexity, IFD) and mean-pooled hidden states (LM embeddings).

Records are tokenized as SFT tokenizes them (`esft.data.tokenize`), packed best-fit-decreasing
into rows (`esft.data.packing`), and run without gradients; every token carries the index of
the record it belongs to, so per-token results are summed back per record with one
``index_add``. The targets and forward arguments are the training ones
(`esft.losses.next_token_targets`, `esft.models.forward.forward_kwargs`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esft.curation.base import Cached
from esft.data.packing import best_fit_decreasing, collate_packed
from esft.data.tokenize import TrainOn, tokenize_records
from esft.losses import next_token_targets
from esft.losses.ce import IGNORE_INDEX
from esft.models import build_model, load_tokenizer
from esft.models.attention import packed_layout
from esft.models.forward import forward_kwargs, plain_head


def load_lm(model_name_or_path: str | None, model_config: dict[str, Any] | None, tokenizer: str | None,
            dtype: str = "float32", seed: int = 0):
    """(model in eval mode, tokenizer): pretrained weights, or a random model from a config (tests)."""
    tok = load_tokenizer(tokenizer or model_name_or_path or "builtin")
    torch.manual_seed(seed)
    model = build_model(tok, model_name_or_path, model_config, dtype)  # type: ignore[arg-type]
    return model.eval(), tok


def _owners(rows: list[list[dict[str, Any]]], layout: str, width: int) -> torch.Tensor:
    """The record index of every token of `collate_packed(rows, layout)` (-1 for filler)."""
    segments = [[e for row in rows for e in row]] if layout == "flat" else rows
    out = []
    for seg in segments:
        used = 0
        for e in seg:
            out.append(torch.full((e["length"],), e["index"], dtype=torch.long))
            used += e["length"]
        out.append(torch.full((width - used,), -1, dtype=torch.long))
    return torch.cat(out)


@torch.no_grad()
def per_record(
    model,
    tokenizer,
    records: list[dict[str, Any]],
    what: Literal["loss", "hidden"],
    max_length: int = 1024,
    max_tokens: int = 8192,
    train_on: TrainOn = "assistant",
    chunk_size: int = 4096,
    desc: str = "scoring",
    progress: bool = False,
) -> torch.Tensor:
    """``what="loss"``: the mean next-token cross-entropy over each record's trained tokens,
    ``[N]`` (NaN for a record with none left after truncation to `max_length`).
    ``what="hidden"``: the mean final hidden state over each record's tokens, ``[N, H]``."""
    # tokenize_records keeps a record's "task" on its example: carry the record index through it
    tagged = [{"messages": r["messages"], "task": i} for i, r in enumerate(records)]
    examples, _ = tokenize_records(tagged, tokenizer, max_length, train_on, "right")
    for e in examples:
        e["index"] = e.pop("task")
    rows = best_fit_decreasing([e["length"] for e in examples], max_length)
    layout = packed_layout(model.config._attn_implementation)
    per_batch = max(1, max_tokens // max_length)
    device = next(model.parameters()).device
    hidden_size = model.config.hidden_size
    sums = torch.zeros((len(records), hidden_size) if what == "hidden" else len(records), dtype=torch.float64)
    counts = torch.zeros(len(records), dtype=torch.float64)
    for lo in tqdm(range(0, len(rows), per_batch), desc=desc, disable=not progress, leave=False):
        group = [[examples[i] for i in row] for row in rows[lo : lo + per_batch]]
        batch = collate_packed(group, layout)
        owner = _owners(group, layout, batch["input_ids"].shape[1])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        kwargs = forward_kwargs(model, batch)
        if what == "hidden":
            h = model.get_decoder()(**kwargs).last_hidden_state.reshape(-1, hidden_size).float().cpu()
            keep = owner >= 0
            sums.index_add_(0, owner[keep], h[keep].double())
            counts.index_add_(0, owner[keep], torch.ones(int(keep.sum()), dtype=torch.float64))
            continue
        targets = next_token_targets(batch["labels"], batch["position_ids"]).reshape(-1)
        keep = targets != IGNORE_INDEX
        if plain_head(model):
            hidden = model.get_decoder()(**kwargs).last_hidden_state.reshape(-1, hidden_size)[keep]
            head = model.get_output_embeddings()
            losses = torch.cat([
                F.cross_entropy(F.linear(hidden[i : i + chunk_size], head.weight, head.bias).float(),
                                targets[keep][i : i + chunk_size], reduction="none")
                for i in range(0, hidden.shape[0], chunk_size)
            ]) if hidden.shape[0] else hidden.new_zeros(0)
        else:
            logits = model(**kwargs).logits.reshape(-1, model.config.vocab_size)[keep]
            losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        idx = owner[keep.cpu()]
        sums.index_add_(0, idx, losses.double().cpu())
        counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))
    if what == "hidden":
        return (sums / counts.clamp(min=1).unsqueeze(1)).float()
    out = sums / counts
    out[counts == 0] = float("nan")
    return out.float()


class LMPart(Cached):
    """Shared configuration of the scorers and embedders that run a causal LM."""

    def __init__(self, model_name_or_path: str | None = None, model_config: dict[str, Any] | None = None,
                 tokenizer: str | None = None, dtype: str = "float32", max_length: int = 1024,
                 max_tokens: int = 8192, seed: int = 0, progress: bool = False, **cache: Any) -> None:
        """
        Args:
            model_name_or_path: the reference model (a path or hub id).
            model_config: or a randomly initialised model from a config (tests only).
            tokenizer: tokenizer (default: the model's, or ``builtin`` for `model_config`).
            dtype: model weights' dtype.
            max_length: records are cut to this many tokens.
            max_tokens: tokens per packed forward pass.
            seed: initialisation seed of a `model_config` model.
            progress: show a progress bar.
            cache, cache_dir: see `esft.curation.base.Cached`.
        """
        super().__init__(**cache)
        self.model_name_or_path, self.model_config, self.tokenizer = model_name_or_path, model_config, tokenizer
        self.dtype, self.max_length, self.max_tokens, self.seed, self.progress = dtype, max_length, max_tokens, seed, progress

    def config(self):
        return {"model": self.model_name_or_path, "model_config": self.model_config, "tokenizer": self.tokenizer,
                "dtype": self.dtype, "max_length": self.max_length, "seed": self.seed if self.model_config else None}

    def run(self, records: list[dict[str, Any]], what: Literal["loss", "hidden"], train_on: TrainOn = "assistant",
            desc: str = "scoring") -> torch.Tensor:
        model, tok = load_lm(self.model_name_or_path, self.model_config, self.tokenizer, self.dtype, self.seed)
        return per_record(model, tok, records, what, self.max_length, self.max_tokens, train_on, desc=desc,
                          progress=self.progress)
