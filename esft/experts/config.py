"""The expert config: which routed experts to train, in the JSON format of deepseek-ai/ESFT.

    {"experts": {"<layer index>": [expert ids]}, "shared_experts": false, "non_expert_modules": false}

Layer keys are decoder-layer indices (strings, as in JSON); a sparse layer that is not listed (or
listed with ``[]``) trains no routed expert. Expert ids are kept sorted. ``shared_experts`` also trains the shared experts (and their gates),
``non_expert_modules`` everything outside the MoE blocks' experts (attention, norms, embeddings,
dense MLPs, routers) — the paper's Table 3 shows both drive forgetting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExpertConfig:
    experts: dict[int, list[int]] = field(default_factory=dict)
    """Decoder-layer index -> sorted routed-expert ids to train."""
    shared_experts: bool = False
    non_expert_modules: bool = False

    def __post_init__(self) -> None:
        # one order everywhere: the trainable slices of a layer hold its experts in ascending id
        # order, whatever order a file or a caller listed them in (deepseek-ai/ESFT lists them by
        # descending score)
        self.experts = {int(layer): sorted(ids) for layer, ids in self.experts.items()}

    @classmethod
    def from_dict(cls, data: dict, where: str = "expert config") -> ExpertConfig:
        if not isinstance(data, dict) or not isinstance(data.get("experts"), dict):
            raise ValueError(f"{where}: expected an object with an 'experts' mapping of layer -> expert ids")
        experts = {}
        for layer, ids in data["experts"].items():
            try:
                index = int(layer)
            except ValueError:
                raise ValueError(f"{where}: layer key {layer!r} is not an integer") from None
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"{where}: experts[{layer!r}] must be a list of non-negative expert ids")
            if len(set(ids)) != len(ids):
                raise ValueError(f"{where}: experts[{layer!r}] lists an expert twice: {ids}")
            experts[index] = sorted(ids)
        unknown = set(data) - {"experts", "shared_experts", "non_expert_modules"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(experts, bool(data.get("shared_experts", False)), bool(data.get("non_expert_modules", False)))

    @classmethod
    def load(cls, path: str | Path) -> ExpertConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expert config {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"expert config {path}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return {"experts": {str(k): list(v) for k, v in sorted(self.experts.items())},
                "shared_experts": self.shared_experts, "non_expert_modules": self.non_expert_modules}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def num_selected(self) -> int:
        return sum(len(v) for v in self.experts.values())
