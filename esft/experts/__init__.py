"""Expert-specialized fine-tuning (ESFT, arXiv 2407.01906) for MoE models: score routed experts on
a task, select the relevant ones, train only them, and ship only what was trained.

    esft experts score  --model BASE --tasks math_word --tokens 131072 --out scores/
    esft experts select --scores scores/scores.json --method token --p 0.2 --out experts.json
    esft fit --config configs/esft/tiny_moe.yaml          # model.init_args.experts: experts.json
    esft experts merge  --base BASE --adapter runs/x/adapter --out merged/
"""

from esft.experts.adapter import load_adapter, merge_adapter, save_adapter
from esft.experts.callbacks import ExportExpertAdapter
from esft.experts.config import ExpertConfig
from esft.experts.scoring import score_experts
from esft.experts.selection import random_like, select_experts
from esft.experts.trainable import apply_expert_config, merge_experts, merged_state_dict

__all__ = ["ExpertConfig", "ExportExpertAdapter", "apply_expert_config", "load_adapter", "merge_adapter",
           "merge_experts", "merged_state_dict", "random_like", "save_adapter", "score_experts", "select_experts"]
