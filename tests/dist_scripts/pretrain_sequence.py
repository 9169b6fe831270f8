"""Several pretraining runs on the same 2 processes (start-up is the cost of a launch), each through the
entry's `main(argv)`; every run's exit code is appended to ``$MIMKIT_EXIT_DIR/codes_<RANK>``.

usage: torchrun ... pretrain_sequence.py ARGS... [--then ARGS...]...
"""
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mimkit.pretrain.trainer import main

dist.destroy_process_group = lambda *a, **k: None  # the next run reuses the process group

groups, current = [], []
for arg in sys.argv[1:]:
    if arg == "--then":
        groups.append(current)
        current = []
    else:
        current.append(arg)
groups.append(current)
codes = []
for argv in groups:
    try:
        codes.append(main(argv))
    except SystemExit as stop:
        codes.append(stop.code)
    print(f"[sequence] run {len(codes)} exit {codes[-1]}", flush=True)
Path(os.environ["MIMKIT_EXIT_DIR"], f"codes_{os.environ['RANK']}").write_text(" ".join(map(str, codes)))
