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
from run_stages import run_stages

from mimkit.distributed.engine import EngineConfig, init_process_group
from mimkit.models.codebook import all_reduce_sum_

seen = guard_collectives()
control = "accepted"
with Residency("cpu"):  # the engine's device on this machine; the guard stands in for a GPU node's
    init_process_group(EngineConfig())  # as the stages start it (DeepSpeed's communication backend)
    try:
        all_reduce_sum_(torch.zeros(2))  # created without a device: on a GPU node a host tensor
    except HostTensorInCollective as refused:
        control = f"refused: {refused}"
    all_reduce_sum_(torch.zeros(2, device="cpu"))  # on the engine's device: passes
    run_stages(json.loads(sys.argv[1]))
if dist.get_rank() == 0:
    with open(sys.argv[2], "w") as f:
        json.dump({"control": control, "seen": dict(seen)}, f, indent=1)
