"""Several pretraining runs on the same 2 processes (start-up is the cost of a launch), each through the
entry's `main(argv)`; every run's exit code is appended to ``$MIMKIT_EXIT_DIR/codes_<RANK>``.

usage: torchrun ... pretrain_sequence.py RUNS.json   (a list of argument lists, one per run)
"""
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mimkit.pretrain.trainer import main

dist.destroy_process_group = lambda *a, **k: None  # the next run reuses the process group

codes = []
for argv in json.loads(Path(sys.argv[1]).read_text()):
    try:
        codes.append(main(argv))
    except SystemExit as stop:
        codes.append(stop.code)
    print(f"[sequence] run {len(codes)} exit {codes[-1]}", flush=True)
Path(os.environ["MIMKIT_EXIT_DIR"], f"codes_{os.environ['RANK']}").write_text(" ".join(map(str, codes)))
