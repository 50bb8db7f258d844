"""Expert selection (ESFT paper, section 3.3): per layer, the fewest top-scored experts whose scores
sum to at least p of the layer's total; and the Table 4 control, random experts of the same count.

The paper thresholds the raw score sum (p = 0.2 for token scores, 0.1 for gate scores on
DeepSeek-V2-Lite, whose gate scores sum to 0.33-0.40 per layer, averaged over its 26 sparse layers,
in each task of deepseek-ai/ESFT's released score files). ``relative=True``
thresholds the fraction of the layer's score mass instead, which means the same thing in every
family (mixtral's renormalised gates sum to 1, deepseek_v3's to about 2.5).
"""

from __future__ import annotations

import random
from typing import Literal

from esft.experts.config import ExpertConfig

Method = Literal["token", "gate"]


def select_layer(scores: list[float], p: float, relative: bool = False) -> list[int]:
    """The smallest set of experts, highest score first, whose scores sum to >= p (of the total
    when `relative`); ties go to the lower id. All experts when the layer never reaches p."""
    if not 0.0 < p <= (1.0 if relative else float("inf")):
        raise ValueError(f"p must be in (0, 1] with relative thresholds, > 0 otherwise; got {p}")
    target = p * sum(scores) if relative else p
    chosen, total = [], 0.0
    for e in sorted(range(len(scores)), key=lambda e: (-scores[e], e)):
        if total >= target and chosen:
            break
        chosen.append(e)
        total += scores[e]
    return sorted(chosen)


def select_experts(scores: dict, method: Method, p: float, relative: bool = False,
                   shared_experts: bool = False, non_expert_modules: bool = False) -> ExpertConfig:
    """An expert config from `esft.experts.scoring.score_experts` output."""
    if method not in ("token", "gate"):
        raise ValueError(f"method must be 'token' or 'gate', got {method!r}")
    table = scores[method]
    return ExpertConfig({int(i): select_layer(v, p, relative) for i, v in table.items()},
                        shared_experts, non_expert_modules)


def random_like(cfg: ExpertConfig, num_experts: int, seed: int = 0, exclude: bool = False) -> ExpertConfig:
    """The same number of experts per layer, drawn uniformly at random (paper Table 4); with
    `exclude`, only from the experts `cfg` did not select (a control that shares no expert with
    the selection), which needs at least as many unselected experts as selected ones per layer."""
    rng = random.Random(seed)
    drawn = {}
    for i, ids in cfg.experts.items():
        pool = [e for e in range(num_experts) if not (exclude and e in ids)]
        if len(pool) < len(ids):
            raise ValueError(f"layer {i}: cannot draw {len(ids)} random experts outside the {len(ids)} selected "
                             f"of {num_experts}; drop the exclusion or select fewer (lower p)")
        drawn[i] = sorted(rng.sample(pool, len(ids)))
    return ExpertConfig(drawn, cfg.shared_experts, cfg.non_expert_modules)
