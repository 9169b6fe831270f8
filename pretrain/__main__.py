"""`deepspeed pretrain --config ...` / `torchrun ... pretrain --config ...` / `python -m mimkit.pretrain`."""

import sys

from mimkit.pretrain.trainer import main

if __name__ == "__main__":
    sys.exit(main())
