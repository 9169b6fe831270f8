"""`mimkit` command: shards, export, knn, demo, submit.

Library sub-commands are modules with `main(argv) -> int`, imported and called. Applications (the demo)
are separate programs: the library never imports them, so the command hands over to them by module name.
"""

from __future__ import annotations

import importlib
import os
import sys

from mimkit.errors import run_main

COMMANDS = {
    "shards": ("mimkit.data.shards", "write WebDataset tar shards from an ImageFolder or a file list"),
    "export": ("mimkit.checkpoint.export", "turn a ZeRO checkpoint into a plain export"),
    "knn": ("mimkit.knn", "weighted k-NN accuracy of an export's (or a checkpoint's) features on labelled images"),
    "submit": ("mimkit.distributed.submit", "submit a stage to Slurm (or run locally) with submitit"),
}
PROGRAMS = {
    "demo": ("mimkit.demo", "run the whole chain on the embedded demo data"),
}


def usage() -> str:
    lines = ["usage: mimkit COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in {**COMMANDS, **PROGRAMS}.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in PROGRAMS:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", PROGRAMS[name][0], *rest])  # does not return
    if name not in COMMANDS:
        print(f"mimkit: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_main(f"mimkit {name}", lambda: module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
