"""Any ViT checkpoint fine-tunes through the CLI: the architecture comes from the checkpoint's shapes
(width, depth, patch size, position tables, heads where a per-head table exists), the rest from
`model.*` keys, and one line says what was read and what was assumed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.checkpoint.load import infer_architecture
from mimkit.config import load_config
from mimkit.data.demo import make_demo_data
from mimkit.finetune.classification import build_classifier
from mimkit.finetune.config import FinetuneConfig
from mimkit.finetune.trainer import main
from mimkit.models.vit import PRESETS, ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"


def _randomized(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """Random values in every tensor (zero-initialised tables and gammas included): a wrong load shows."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", num_classes=4, images_per_class=8,
                          val_per_class=4, image_size=32, images_per_shard=64)


def finetune(demo, tmp_path, init, *extra) -> tuple[str, Path]:
    """2 steps at lr 0 (the encoder stays what was loaded) through the CLI entry; (its stdout, run folder)."""
    argv = ["--config", str(TINY), f"run.root={tmp_path}", "run.name=ft", f"data.root={demo.imagefolder_train.parent}",
            "data.batch_size=8", "data.eval_batch_size=16", "optim.max_steps=2", "optim.epochs=1", "optim.lr=0",
            "optim.min_lr=0", "aug.enabled=false", "model.drop_path=0", f"model.init={init}", *extra]
    assert main(argv) == 0
    return argv, tmp_path / "ft"


def test_a_vit_s_shaped_checkpoint_fine_tunes_with_heads_from_a_key(demo, tmp_path, capsys):
    """Width 96, depth 3, 3 heads (head size 32), learned positions: no preset has it."""
    arch = ViTConfig(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3, mlp_ratio=2.0)
    assert all((p.embed_dim, p.depth) != (96, 3) for p in PRESETS.values())
    source = _randomized(arch)
    torch.save({"model": source.state_dict()}, tmp_path / "vit_s_like.pth")  # timm layout under "model"
    finetune(demo, tmp_path, tmp_path / "vit_s_like.pth", "model.num_heads=3")
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model.init="))
    assert re.search(r"no mimkit\.json: from its shapes embed_dim 96, depth 3, patch_size 8, img_size 32, "
                     r"mlp_ratio 2, pos_embed learned, .*; num_heads 3 from model\.num_heads", line), line
    assert "2 missing, 0 unexpected" in line  # the fresh fc_norm of mean pooling, named in the run's report:
    assert "missing (2): fc_norm.weight, fc_norm.bias" in (tmp_path / "ft" / "load_report.txt").read_text()
    trained = load_file(str(tmp_path / "ft" / "checkpoints" / "epoch_0000" / "model.safetensors"))
    for key in ("blocks.2.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        assert torch.equal(trained[key], source.state_dict()[key]), key
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["steps"] == 2
    # without the key, heads are assumed (head size 64: 1 head) and the line says so
    cfg = load_config(FinetuneConfig, TINY, [f"model.init={tmp_path / 'vit_s_like.pth'}"])
    model, report, _ = build_classifier(cfg)
    assert model.cfg.num_heads == 1 and "num_heads 1 assumed (no per-head table: set model.num_heads)" in report.summary()
    # a key that contradicts the shapes is refused, naming both
    cfg.model.embed_dim = 128
    with pytest.raises(ValueError, match=r"model\.embed_dim=128: the checkpoint \(model\.init=\S+\) has embed_dim 96"):
        build_classifier(cfg)


def test_a_patch14_official_beit_checkpoint_fine_tunes_with_heads_from_its_table(demo, tmp_path, capsys):
    """Official BEiT pretraining layout (gamma_1 / gamma_2, saved index, lm_head, under "model"), patch 14 at
    28 px, a shared rel-pos table with a column per head: every field comes from the file."""
    arch = ViTConfig(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=8, qkv_bias="qv", pos_embed="none",
                     rel_pos="shared", layer_scale_init=0.1, mask_token=True)
    source = _randomized(arch, seed=1)
    state = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v.clone() for k, v in source.state_dict().items()}
    state["lm_head.weight"], state["lm_head.bias"] = torch.randn(512, 64), torch.zeros(512)
    torch.save({"model": state}, tmp_path / "beit_p14.pth")
    assert infer_architecture(torch.load(tmp_path / "beit_p14.pth", weights_only=True))[1] == []  # nothing assumed
    finetune(demo, tmp_path, tmp_path / "beit_p14.pth", "model.rel_pos=block")
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("model.init="))
    assert re.search(r"layout beit; no mimkit\.json: from its shapes embed_dim 64, depth 2, num_heads 8, patch_size 14, "
                     r"img_size 28, .*pos_embed none, rel_pos shared, qkv_bias qv", line), line
    assert "2 missing, 0 unexpected" in line and "assumed" not in line  # fc_norm: fresh
    trained = load_file(str(tmp_path / "ft" / "checkpoints" / "epoch_0000" / "model.safetensors"))
    shared = source.state_dict()["rel_pos_bias.relative_position_bias_table"]
    for i in range(2):  # the shared table became each block's own
        assert torch.equal(trained[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    assert torch.equal(trained["blocks.1.ls2.gamma"], source.state_dict()["blocks.1.ls2.gamma"])
    assert torch.equal(trained["patch_embed.proj.weight"], source.state_dict()["patch_embed.proj.weight"])
