"""Train visual tokenizers (dVAE, PeCo VQ, VQ-KD): `deepspeed tokenizers --config ...`."""
