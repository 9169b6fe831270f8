"""Run stages (`mimkit.pretrain.trainer.train`, `mimkit.tokenizers.cli.main`) in turn in one launch (a
DeepSpeed import and a process group for all of them).

    run_stages.py JSON_LIST_OF_[stage, argv]
"""

import json
import sys

import torch.distributed as dist

from mimkit.pretrain.trainer import parse_args, train
from mimkit.tokenizers.cli import main as tokenizers_main

# pretraining by `train`: its `main` also ends the process group, and the next stage runs in this process
STAGES = {"pretrain": lambda argv: train(parse_args(argv)), "tokenizers": tokenizers_main}


def run_stages(stages: list) -> None:
    for stage, argv in stages:
        code = STAGES[stage](argv)
        if code:
            raise SystemExit(f"{stage} exited {code}")


if __name__ == "__main__":
    run_stages(json.loads(sys.argv[1]))
    dist.barrier()
    dist.destroy_process_group()
