"""The finetune entry as torchrun runs it, for several runs in one launch and with each process's own exit
code recorded (torchrun reports only the first failure, and 1 as its own code).

usage: torchrun ... finetune_exit_entry.py ARGS... [--then ARGS...]...
Runs `finetune ARGS` for each group in turn on the same processes, stops at the first non-zero code, writes
it to ``$MIMKIT_EXIT_DIR/exit_<RANK>`` and exits with it. Saves the interpreter and torch start-up per run.
"""
import os
import sys
from pathlib import Path

from mimkit.finetune.trainer import main

groups, current = [], []
for arg in sys.argv[1:]:
    if arg == "--then":
        groups.append(current)
        current = []
    else:
        current.append(arg)
groups.append(current)
code = 0
for argv in groups:
    code = main(argv)
    if code:
        break
Path(os.environ["MIMKIT_EXIT_DIR"], f"exit_{os.environ['RANK']}").write_text(str(code))
sys.exit(code)
