"""2-rank pretraining stand-in for the export tests: for each (stage, precision) it trains a tiny
encoder + decoder a few steps through mimkit's Engine, saves with CheckpointStore, and writes the live
model's full weights (gathered under ZeRO-3) to RUN/live.safetensors for comparison.

usage: torchrun --nproc_per_node 2 make_zero_runs.py OUT_ROOT STAGE:PRECISION [...]
"""
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mimkit.checkpoint.store import CheckpointStore
from mimkit.distributed.engine import Engine, EngineConfig
from mimkit.models.vit import VisionTransformer, preset
from mimkit.optim import param_groups


class TinyPretrain(nn.Module):
    """Encoder with a frozen sin-cos table + a decoder that is not part of the export."""

    def __init__(self, vit_cfg):
        super().__init__()
        self.encoder = VisionTransformer(vit_cfg)
        self.decoder = nn.Linear(vit_cfg.embed_dim, 3 * vit_cfg.patch_size ** 2)

    def forward(self, images):
        tokens = self.encoder.forward_features(images)[:, 1:]  # [B, N, D]
        return self.decoder(tokens).float().pow(2).mean()


def live_state(engine) -> dict:
    """Full fp32 weights of the live module, on every rank (ZeRO-3 gathers its partitions)."""
    module = engine.module
    params = list(module.parameters())
    if engine.cfg.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def main() -> None:
    out_root = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        stage, precision = spec.split(":")
        torch.manual_seed(0)
        vit_cfg = preset("vit_tiny_cpu", pos_embed="sincos", layer_scale_init=0.1)
        model = TinyPretrain(vit_cfg)
        groups = param_groups(model, weight_decay=0.05, layer_decay=0.75, num_layers=vit_cfg.depth)
        engine = Engine(model, groups, EngineConfig(zero_stage=int(stage), precision=precision), micro_batch_size=2,
                        lr=1e-2)
        run = out_root / f"zero{stage}_{precision}"
        torch.manual_seed(1 + engine.rank)
        for _ in range(3):
            images = torch.randn(2, 3, 32, 32).to(engine.dtype)
            engine.train_step(engine(images))
        store = CheckpointStore(run / "checkpoints")
        store.save(engine, step=3, client_state={"samples": 3 * 2 * engine.world_size,
                                                "export_meta": {"method": "mae", "tokenizer": None, "teacher": None}})
        live = live_state(engine)
        if engine.rank == 0:
            cfg = {"objective": "mae", "model": dataclasses.asdict(vit_cfg),
                   "data": {"shards": "", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}}
            OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
            save_file({k: v.contiguous() for k, v in live.items()}, str(run / "live.safetensors"))
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
