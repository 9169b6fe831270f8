"""Stage entries run one after another on the same 2 processes, each with a user error (start-up is the
cost of a launch). For each case, every rank writes its exit code and what it printed to stderr into
``$MIMKIT_EXIT_DIR/case<i>_rank<r>.json``.

usage: torchrun ... user_errors.py CASES.json   (a list of [stage, argv] pairs; stage: pretrain | finetune | tokenizers)
"""
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from mimkit.finetune.trainer import main as finetune
from mimkit.pretrain.trainer import main as pretrain
from mimkit.tokenizers.cli import main as tokenizers

dist.destroy_process_group = lambda *a, **k: None  # the next entry reuses the process group
ENTRIES = {"pretrain": pretrain, "finetune": finetune, "tokenizers": tokenizers}

out = Path(os.environ["MIMKIT_EXIT_DIR"])
for i, (stage, argv) in enumerate(json.loads(Path(sys.argv[1]).read_text())):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = ENTRIES[stage](argv)
        except SystemExit as stop:
            code = stop.code
        except BaseException:  # a traceback the entry let through: recorded, not raised
            import traceback

            code, _ = "raised", traceback.print_exc(file=err)
    (out / f"case{i}_rank{os.environ['RANK']}.json").write_text(json.dumps({"code": code, "stderr": err.getvalue()}))
