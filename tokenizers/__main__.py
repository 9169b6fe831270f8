"""`deepspeed tokenizers --config configs/tokenizers/NAME.yaml [dotted.key=value ...]` (any launcher)."""
import sys

from mimkit.tokenizers.cli import main

if __name__ == "__main__":
    sys.exit(main())
