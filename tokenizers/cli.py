"""Entry of the tokenizers stage: parse the typed config, train, print where the export went."""

from __future__ import annotations

from typing import Sequence

from mimkit.config import parse_cli
from mimkit.errors import run_main
from mimkit.tokenizers.config import TokenizerTrainConfig


def main(argv: Sequence[str] | None = None) -> int:
    """User errors (bad keys, missing paths, empty data, refused checkpoints): one line on rank 0, exit 2."""
    return run_main("tokenizers", lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    cfg = parse_cli(TokenizerTrainConfig, argv, prog="tokenizers",
                    description="Train a visual tokenizer (dvae, peco, vqkd) and write its export.")
    from mimkit.tokenizers.trainer import train  # heavy imports after the config is valid

    run_dir = train(cfg)
    from mimkit.runlog import is_rank0

    if is_rank0():
        print(f"tokenizer export: {run_dir / 'export'}")
    return 0
