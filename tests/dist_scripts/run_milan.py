"""Several pretrain runs in one torchrun launch (tests): `run_milan.py ARGS [--then ARGS ...]`.

Each ARGS is what `python -m mimkit.pretrain` takes (`--config FILE key=value ...`); the runs go one
after the other through the real trainer (`mimkit.pretrain.trainer.train`) in the same process group,
which saves a launch (interpreter, torch and DeepSpeed start-up) per run. The first run starts from a
fresh process, so it is exactly what a launch of its own would do.
"""

import sys

import torch.distributed as dist

from mimkit.pretrain.trainer import parse_args, train


def split_runs(argv: list[str]) -> list[list[str]]:
    runs, current = [], []
    for arg in argv:
        if arg == "--then":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    return runs + [current]


def main(argv: list[str]) -> int:
    code = 0
    for args in split_runs(argv):
        code = train(parse_args(args, prog="run_milan"))
        if code:
            break
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
