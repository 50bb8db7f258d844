"""Expert relevance scores (ESFT paper, arXiv 2407.01906, section 3.2) in one pass over a sample of
a task's data, and their heatmap (the paper's Figure 2).

For sparse layer l and routed expert e, with ``g[t, e]`` the gate value of token t (0 where e is
not among t's top-K) and K the experts per token:

- gate score  ``mean over tokens g[t, e]``
- token score ``mean over tokens 1[e in topK(t)] / K``

``average="tokens"`` (the default) pools all tokens of the sample, as deepseek-ai/ESFT's released
score files do (checked against its raw per-token logs: pooled means match its ``summary.json`` to
its 4-decimal rounding, per-sequence means do not). ``average="sequences"`` takes the mean per
sequence first and then the mean over sequences (the paper's equations read either way; this
project's score files before the option used it). Score files record which in ``"average"``.

Token scores sum to 1 per layer; gate scores sum to the family's mean top-K gate mass, so a gate
threshold p means different things per family. Measured with transformers 5 (5.24), summed over
experts and averaged over tokens, a layer's top-K gate values came to: deepseek_v2
0.29 (softmax probabilities, not renormalised, as in DeepSeek-V2-Lite, whose released scores in
deepseek-ai/ESFT give 0.33-0.40 per task, averaged over layers), qwen2_moe
0.30, olmoe 0.30, mixtral 1.00 (renormalised), deepseek_v3 2.50 (sigmoid scores times
``routed_scaling_factor``).

`load_scores` also reads the reference's ``summary.json`` (``{"token_scores": {layer: {expert:
score}}, "gate_scores": ...}``), so its released scores select experts here.

Sequences are packed into flat batches of at most `max_tokens` tokens with ``position_ids``
restarting per document (the attention keeps them apart); the routers' outputs are captured by
forward hooks on ``layer.mlp.gate``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

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


Average = Literal["tokens", "sequences"]


@torch.no_grad()
def score_experts(model: nn.Module, sequences: Sequence[Sequence[int]], max_tokens: int = 4096,
                  progress: bool = True, average: Average = "tokens") -> dict:
    """Gate and token scores per sparse layer and routed expert.

    Args:
        model: a supported MoE causal LM (see `esft.models.moe`).
        sequences: token-id lists, one per sequence (document).
        max_tokens: tokens per forward pass.
        average: ``"tokens"`` pools all tokens; ``"sequences"`` averages per-sequence means.
    Returns:
        ``{"gate": {layer: [E floats]}, "token": {layer: [E floats]}, "average", "num_sequences",
        "num_tokens", "top_k", "num_experts", "model_type"}`` with integer layer keys.
    """
    if average not in ("tokens", "sequences"):
        raise ValueError(f"average must be 'tokens' or 'sequences', got {average!r}")
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
                if average == "sequences":
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
    n = n_tok if average == "tokens" else n_seq
    return {"gate": {i: (v / n).tolist() for i, v in gate.items()},
            "token": {i: (v / n).tolist() for i, v in token.items()},
            "average": average, "num_sequences": n_seq, "num_tokens": n_tok, "top_k": k, "num_experts": num_experts,
            "model_type": model.config.model_type}


def save_scores(scores: dict, path: str | Path) -> None:
    data = dict(scores, gate={str(i): v for i, v in scores["gate"].items()},
                token={str(i): v for i, v in scores["token"].items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def _from_reference(data: dict, where: Path) -> dict:
    """deepseek-ai/ESFT's ``summary.json`` (``{"token_scores": {layer: {expert: score}}, ...}``) in
    this module's layout."""
    out: dict = {"average": "tokens", "source": "deepseek-ai/ESFT summary.json"}
    for ours, theirs in (("gate", "gate_scores"), ("token", "token_scores")):
        if not isinstance(data.get(theirs), dict):
            raise ValueError(f"{where}: a deepseek-ai/ESFT score file needs a {theirs!r} object of layer -> expert -> score")
        out[ours] = {}
        for layer, table in data[theirs].items():
            ids = sorted(int(e) for e in table)
            if ids != list(range(len(ids))):
                raise ValueError(f"{where}: {theirs}[{layer!r}] does not list experts 0..{len(ids) - 1}")
            out[ours][int(layer)] = [float(table[str(e)]) for e in ids]
    out["num_experts"] = len(next(iter(out["token"].values()), []))
    return out


def load_scores(path: str | Path) -> dict:
    """Scores written by `save_scores`, or deepseek-ai/ESFT's ``summary.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert scores {path} do not exist (write them with `esft experts score`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"expert scores {path}: not valid JSON ({e})") from None
    if "token_scores" in data or "gate_scores" in data:
        return _from_reference(data, path)
    for key in ("gate", "token"):
        if key not in data:
            raise ValueError(f"{path}: expert scores lack the {key!r} table")
        data[key] = {int(i): v for i, v in data[key].items()}
    data.setdefault("average", "sequences")  # files written before the option averaged per sequence
    return data


def concentration(scores: dict, method: Literal["gate", "token"] = "token") -> dict[int, dict[str, float]]:
    """How concentrated each layer's scores are (the paper's Figure 2 shows few experts taking a
    task's tokens): per layer, the effective number of experts ``exp(H(s / sum s))`` (E when every
    expert scores the same, 1 when one takes everything) and the top expert's share of the total."""
    out = {}
    for layer, values in sorted(scores[method].items()):
        share = torch.tensor(values, dtype=torch.float64)
        share = share / share.sum().clamp(min=1e-12)
        entropy = -(share * share.clamp(min=1e-12).log()).sum()
        out[layer] = {"effective_experts": float(entropy.exp()), "top_share": float(share.max())}
    return out


def score_distance(a: dict, b: dict, method: Literal["gate", "token"] = "token") -> float:
    """Mean over the shared layers of the total-variation distance between two score files'
    normalised score distributions: 0 when two tasks use the experts alike, 1 when they share no
    expert (task specialisation, the paper's Figure 2 read across tasks)."""
    layers = sorted(set(a[method]) & set(b[method]))
    if not layers:
        raise ValueError("score_distance: the two score files share no layer")
    total = 0.0
    for layer in layers:
        x, y = (torch.tensor(s[method][layer], dtype=torch.float64) for s in (a, b))
        total += float(0.5 * (x / x.sum() - y / y.sum()).abs().sum())
    return total / len(layers)


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
