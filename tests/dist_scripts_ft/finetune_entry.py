"""The finetune entry as torchrun runs it (`torchrun --nproc_per_node 2 finetune_entry.py --config ...`)."""
import sys

from mimkit.finetune.trainer import main

sys.exit(main())
