"""`python finetune ...`, `accelerate launch finetune ...`, `torchrun ... finetune ...`."""
import sys

from mimkit.finetune.trainer import main

sys.exit(main())
