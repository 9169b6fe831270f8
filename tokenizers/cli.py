"""Entry of the tokenizers stage: parse the typed config, train, print where the export went."""

from __future__ import annotations

import sys
from typing import Sequence

from mimkit.config import parse_cli
from mimkit.tokenizers.config import TokenizerTrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_cli(TokenizerTrainConfig, argv, prog="tokenizers",
                    description="Train a visual tokenizer (dvae, peco, vqkd) and write its export.")
    from mimkit.tokenizers.trainer import train  # heavy imports after the config is valid

    from mimkit.checkpoint.store import CheckpointError

    try:
        run_dir = train(cfg)
    except CheckpointError as err:  # a checkpoint refused on resume: one line, not a traceback per rank
        print(f"tokenizers: {err}", file=sys.stderr, flush=True)
        return 1
    from mimkit.runlog import is_rank0

    if is_rank0():
        print(f"tokenizer export: {run_dir / 'export'}")
    return 0
