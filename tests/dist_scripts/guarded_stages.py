"""Run stages (`mimkit.pretrain.trainer.train`, `mimkit.tokenizers.cli.main`) in turn under
`device_guard`: every collective mimkit issues must hand over tensors that would live on the accelerator.

    guarded_stages.py JSON_LIST_OF_[stage, argv] OUT_JSON

First a control: a host tensor through mimkit's own all-reduce helper must be refused (else the guard
judges nothing). Rank 0 writes {"control": ..., "seen": {call site: count}} to OUT_JSON."""

import json
import sys

import torch
import torch.distributed as dist

from device_guard import HostTensorInCollective, Residency, guard_collectives

from mimkit.distributed.engine import EngineConfig, init_process_group
from mimkit.models.codebook import all_reduce_sum_
from mimkit.pretrain.trainer import parse_args, train
from mimkit.tokenizers.cli import main as tokenizers_main

# pretraining by `train`: its `main` also ends the process group, and the next stage runs in this process
STAGES = {"pretrain": lambda argv: train(parse_args(argv)), "tokenizers": tokenizers_main}

seen = guard_collectives()
control = "accepted"
with Residency("cpu"):  # the engine's device on this machine; the guard stands in for a GPU node's
    init_process_group(EngineConfig())  # as the stages start it (DeepSpeed's communication backend)
    try:
        all_reduce_sum_(torch.zeros(2))  # created without a device: on a GPU node a host tensor
    except HostTensorInCollective as refused:
        control = f"refused: {refused}"
    all_reduce_sum_(torch.zeros(2, device="cpu"))  # on the engine's device: passes
    for stage, argv in json.loads(sys.argv[1]):
        code = STAGES[stage](argv)
        if code:
            raise SystemExit(f"{stage} exited {code}")
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"control": control, "seen": dict(seen)}, f, indent=1)
