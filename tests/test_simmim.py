"""SimMIM, added through the method contract alone (pretrain/simmim.py): masks hide whole 2x2-patch units,
the loss is L1 on the masked pixels only, and on 2 DeepSpeed ranks the loss falls on the demo shards and
the run exports its encoder."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.data.demo import make_demo_data
from mimkit.models.vit import VisionTransformer
from mimkit.pretrain.config import load_pretrain_config
from mimkit.pretrain.objectives import build_objective
from mimkit.pretrain.parts import patchify
from mimkit.runlog import read_metrics

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
PRESET = PRESETS / "simmim_tiny_cpu.yaml"


def test_simmim_masks_units_and_scores_l1_on_masked_pixels():
    torch.manual_seed(0)
    simmim = build_objective(load_pretrain_config(PRESET))
    batch = {"image": torch.randn(2, 3, 32, 32)}
    batch.update(simmim.masks(2, torch.Generator().manual_seed(0)))
    batch.update(simmim.targets(batch))
    mask = batch["mask"]                                                    # [2, 64]: an 8x8 patch grid
    units = mask.view(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    assert (units.all(-1) | ~units.any(-1)).all() and (mask.sum(1) == 40).all()  # 10 of 16 units: 60 %
    out = simmim.model(batch)
    model = simmim.model
    tokens = model.encoder.forward_features(batch["image"], mask=mask)     # every position, mask tokens in
    pixels = model.decoder(tokens)[:, 1:]                                   # [2, 64, 4*4*3]: drop the CLS
    expected = (pixels - patchify(batch["image"], 4)).abs().mean(-1)[mask].mean()
    torch.testing.assert_close(out["loss"], expected)
    # the raw pixels, not normalised per patch; and visible pixels do not count
    torch.testing.assert_close(batch["target"], patchify(batch["image"], 4))
    changed = dict(batch, target=torch.where(mask[..., None], batch["target"], batch["target"] + 1))
    torch.testing.assert_close(model(changed)["loss"], out["loss"])


def test_the_paper_preset_is_simmims_recipe():
    cfg = load_pretrain_config(PRESETS / "simmim_vit_b16.yaml")
    m = cfg.method
    assert (m.mask_ratio, m.mask_unit, m.target, m.norm_pix, m.decoder, m.loss, m.loss_on) == (
        0.6, 2, "pixels", False, "linear", "l1", "masked")
    assert cfg.model.mask_token and cfg.model.patch_size == 16 and cfg.model.rel_pos == "shared"
    assert cfg.data.batch_size * 16 == 2048 and cfg.optim.lr * 2048 / cfg.optim.base_batch_size == pytest.approx(4e-4)


def test_two_rank_simmim_loss_falls_and_exports(tmp_path):
    data = make_demo_data(tmp_path / "demo", image_size=32, images_per_class=12, val_per_class=1, images_per_shard=16)
    steps = 60
    args = ["--config", PRESET, f"data.shards={data.train_shard_pattern}", f"run.root={tmp_path / 'runs'}",
            "run.name=simmim", f"run.steps={steps}", "run.log_every=1", "run.save_every=30", "data.num_workers=0",
            "data.batch_size=8"]
    _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py", args, cwd=tmp_path, timeout=300)
    run_dir = tmp_path / "runs" / "simmim"
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == steps and read_metrics(run_dir)[-1]["event"] == "end"
    # L1 on raw pixels falls slowly at this size (0.91-0.93 of the first ten steps' mean after 60, over 3 seeds)
    assert sum(losses[-10:]) < 0.96 * sum(losses[:10]), losses
    meta = json.loads((run_dir / "export" / "mimkit.json").read_text())
    assert meta["method"] == "simmim" and meta["step"] == steps
    encoder = VisionTransformer(load_pretrain_config(PRESET).model)
    encoder.load_state_dict(load_file(str(run_dir / "export" / "model.safetensors")))  # the encoder, nothing else
    assert list((run_dir / "pictures").glob("masks_*.png"))  # masked images and their reconstruction
