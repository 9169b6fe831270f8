"""The pretrain entry, as `deepspeed pretrain` / `torchrun ... pretrain` run it (tests launch this file)."""

import sys

from mimkit.pretrain.trainer import main

sys.exit(main())
