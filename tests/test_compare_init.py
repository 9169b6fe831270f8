"""compare_init: several exports against scratch arms of their own network, seeds and lrs, the table's
numbers (mean, spread, lead) equal to the runs behind them."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
from safetensors.torch import save_file

from mimkit.data.demo import make_demo_data
from mimkit.finetune import compare_init
from mimkit.models.vit import ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
DEMO_FT = ROOT / "configs" / "finetune" / "demo_cpu.yaml"
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32, "interpolation": "bicubic"}


def write_export(folder: Path, cfg: ViTConfig) -> Path:
    """A minimal mimkit export: encoder weights + mimkit.json (architecture, pixel norm)."""
    folder.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in VisionTransformer(cfg).state_dict().items() if not k.startswith("head")}
    save_file(state, str(folder / "model.safetensors"))
    meta = {"format": "mimkit-export", "version": 1, "architecture": dataclasses.asdict(cfg), "pixel_norm": NORM}
    (folder / "mimkit.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("cmp") / "data", num_classes=4, images_per_class=10,
                          val_per_class=5, image_size=32, images_per_shard=64)


def test_exports_share_a_scratch_arm_only_when_their_networks_match(tmp_path, demo):
    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed="sincos")
    mae = write_export(tmp_path / "mae", vit)
    # MILAN-like: same network once the fine-tuning head options replace the pooling choice
    milan = write_export(tmp_path / "milan", dataclasses.replace(vit, global_pool="avg"))
    beit = write_export(tmp_path / "beit", dataclasses.replace(vit, pos_embed="none", rel_pos="shared",
                                                               qkv_bias="qv", layer_scale_init=0.1))
    overrides = [f"run.root={tmp_path / 'runs'}", "run.name=cmp", f"data.root={demo.imagefolder_train.parent}",
                 "data.label_fraction=0.5", "optim.epochs=1", "data.batch_size=4", "data.eval_batch_size=20",
                 "model.img_size=32"]
    rows = compare_init.compare(compare_init.parse_inits([f"mae={mae}", f"milan={milan}", f"beit={beit}"]),
                                str(DEMO_FT), overrides, seeds=(0, 1), lrs=(1e-3, 3e-3))
    assert set(rows) == {"mae", "milan", "beit", "scratch_mae", "scratch_beit"}
    assert rows["mae"]["vs"] == rows["milan"]["vs"] == "scratch_mae" and rows["beit"]["vs"] == "scratch_beit"
    for name, row in rows.items():
        assert len(row["top1_runs"]) == 2 and row["count"] == demo.num_val and row["train_images"] == 20
        assert row["top1"] == pytest.approx(statistics.fmean(row["top1_runs"]), abs=0.01)
        assert row["top1_std"] == pytest.approx(statistics.pstdev(row["top1_runs"]), abs=0.01)
        # each arm is scored at its own best lr
        assert row["top1"] == pytest.approx(max(v["top1"] for v in row["by_lr"].values()), abs=0.01)
        assert row["by_lr"][f"{row['lr']:g}"]["top1"] == pytest.approx(row["top1"], abs=0.01)
    assert rows["beit"]["lead"] == pytest.approx(rows["beit"]["top1"] - rows["scratch_beit"]["top1"], abs=0.02)
    # run folders are named by arm, lr and seed
    run_dirs = sorted((tmp_path / "runs").glob("cmp_scratch_beit_lr0.001_s0"))
    assert run_dirs, sorted(p.name for p in (tmp_path / "runs").iterdir())
    table = compare_init.format_table(rows)
    assert "scratch_beit" in table and f"{rows['mae']['lead']:+.1f}" in table


def test_init_names_must_be_unique_and_not_scratch():
    assert compare_init.parse_inits(["runs/x/export"]) == {"pretrained": "runs/x/export"}
    assert set(compare_init.parse_inits(["runs/a/export", "runs/b/export"])) == {"a", "b"}
    for bad in (["a=x", "a=y"], ["scratch=x"]):
        with pytest.raises(SystemExit, match="unique NAME=PATH"):
            compare_init.parse_inits(bad)
