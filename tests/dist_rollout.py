"""Run by tests/test_distributed.py under ``torch.distributed.run`` with 2 processes: FSDP2-shard
a tiny model and generate greedily with a different token limit per rank; write each rank's
completions and the unsharded model's to ``<out>/rank<k>.json``."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from conftest import TINY
from esft.evaluation import rollout
from esft.models import build_model, load_tokenizer
from esft.models.sharding import shard_fsdp2

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
tokenizer = load_tokenizer("builtin")
model = build_model(tokenizer, model_config=TINY["llama"])
conversations = [[{"role": "user", "content": f"What is {rank} + {i}?"}] for i in range(3)]
limit = 3 + 5 * rank  # rank 0 is done after 3 steps, rank 1 after 8
ids = lambda outs: [r.completion_ids for r in outs]  # noqa: E731
reference = ids(rollout(copy.deepcopy(model), tokenizer, conversations, max_new_tokens=limit, batch_size=2))
shard_fsdp2(model, init_device_mesh("cpu", (2,)))
sharded = ids(rollout(model, tokenizer, conversations, max_new_tokens=limit, batch_size=2))
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({"reference": reference, "sharded": sharded}))
dist.destroy_process_group()
