"""Expert relevance scores (ESFT paper, arXiv 2407.01906, section 3.2) in one pass over a sample of
a task's data, and their heatmap (the paper's Figure 2).

For sparse layer l and routed expert e, with ``g[t, e]`` the gate value of token t (0 where e is
not among t's top-K) and K the experts per token:

- gate score  ``mean over sequences ( mean over the sequence's tokens g[t, e] )``
- token score ``mean over sequences ( mean over the sequence's tokens 1[e in topK(t)] / K )``

Token scores sum to 1 per layer; gate scores sum to the family's mean top-K gate mass, so a gate
threshold p means different things per family. Measured with transformers 5 (5.24), summed over
experts and averaged over tokens, a layer's top-K gate values came to: deepseek_v2
0.29 (softmax probabilities, not renormalised: the paper's DeepSeek-V2-Lite setting), qwen2_moe
0.30, olmoe 0.30, mixtral 1.00 (renormalised), deepseek_v3 2.50 (sigmoid scores times
``routed_scaling_factor``).

Sequences are packed into flat batches of at most `max_tokens` tokens with ``position_ids``
restarting per document (the attention keeps them apart); the routers' outputs are captured by
forward hooks on ``layer.mlp.gate``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from esft.extras import require
from esft.models.moe import moe_adapter


def _batches(sequences: Sequence[Sequence[int]], max_tokens: int):
    batch: list[Sequence[int]] = []
    for seq in sequences:
        if batch and sum(map(len, batch)) + len(seq) > max_tokens:
            yield batch
            batch = []
        batch.append(seq[:max_tokens])
    if batch:
        yield batch


@torch.no_grad()
def score_experts(model: nn.Module, sequences: Sequence[Sequence[int]], max_tokens: int = 4096,
                  progress: bool = True) -> dict:
    """Gate and token scores per sparse layer and routed expert.

    Args:
        model: a supported MoE causal LM (see `esft.models.moe`).
        sequences: token-id lists, one per sequence (document).
        max_tokens: tokens per forward pass.
    Returns:
        ``{"gate": {layer: [E floats]}, "token": {layer: [E floats]}, "num_sequences", "num_tokens",
        "top_k", "num_experts", "model_type"}`` with integer layer keys.
    """
    family = moe_adapter(model)
    blocks = family.layers(model)
    num_experts, k = family.num_experts(model.config), family.top_k(model.config)
    device = next(model.parameters()).device
    routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [block.gate.register_forward_hook(lambda m, a, out, i=i: routed.__setitem__(i, (out[1], out[2])))
             for i, block in blocks.items()]
    gate = {i: torch.zeros(num_experts, dtype=torch.float64) for i in blocks}
    token = {i: torch.zeros(num_experts, dtype=torch.float64) for i in blocks}
    n_seq = n_tok = 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=sum(len(s) for s in sequences), desc="scoring experts", unit="tok", disable=not progress)
        for batch in _batches(sequences, max_tokens):
            lengths = torch.tensor([len(s) for s in batch])
            ids = torch.tensor([t for s in batch for t in s], device=device)[None]
            positions = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]
            doc = torch.repeat_interleave(torch.arange(len(batch)), lengths).to(device)
            routed.clear()
            model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False)
            for i, (weights, index) in routed.items():
                dense = torch.zeros(index.shape[0], num_experts, device=device, dtype=torch.float64)
                dense.scatter_add_(1, index, weights.double())
                hits = torch.zeros_like(dense).scatter_add_(1, index, torch.full_like(dense[:, :k], 1.0 / k))
                per_doc = torch.zeros(len(batch), 2 * num_experts, device=device, dtype=torch.float64)
                per_doc.index_add_(0, doc, torch.cat([dense, hits], 1))
                per_doc /= lengths.to(per_doc)[:, None]
                gate[i] += per_doc[:, :num_experts].sum(0).cpu()
                token[i] += per_doc[:, num_experts:].sum(0).cpu()
            n_seq += len(batch)
            n_tok += int(lengths.sum())
            bar.update(int(lengths.sum()))
        bar.close()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n_seq == 0:
        raise ValueError("no sequences to score experts on")
    return {"gate": {i: (v / n_seq).tolist() for i, v in gate.items()},
            "token": {i: (v / n_seq).tolist() for i, v in token.items()},
            "num_sequences": n_seq, "num_tokens": n_tok, "top_k": k, "num_experts": num_experts,
            "model_type": model.config.model_type}


def save_scores(scores: dict, path: str | Path) -> None:
    data = dict(scores, gate={str(i): v for i, v in scores["gate"].items()},
                token={str(i): v for i, v in scores["token"].items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_scores(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert scores {path} do not exist (write them with `esft experts score`)")
    data = json.loads(path.read_text())
    for key in ("gate", "token"):
        if key not in data:
            raise ValueError(f"{path}: expert scores lack the {key!r} table")
        data[key] = {int(i): v for i, v in data[key].items()}
    return data


def plot_heatmap(scores: dict, path: str | Path, title: str = "") -> None:
    """Layers x experts heatmaps of the gate and token scores, side by side (PNG)."""
    matplotlib = require("matplotlib", "plots", "expert score heatmaps")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(scores["gate"])), squeeze=False)
    for ax, key in zip(axes[0], ("gate", "token")):
        layers = sorted(scores[key])
        grid = torch.tensor([scores[key][i] for i in layers])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        ax.set_title(f"{key} score {title}".strip())
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
