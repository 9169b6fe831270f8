"""Masked image modeling pretraining on DeepSpeed ZeRO: `deepspeed pretrain --config ...`."""
