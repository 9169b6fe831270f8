import argparse
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from mimkit.checkpoint.load import detect_layout, load_checkpoint_into_vit, load_into_vit, load_state
from mimkit.checkpoint.safe_load import UnsafeCheckpointFile
from mimkit.checkpoint.timm_layout import to_timm_beit_state_dict
from mimkit.models.pos_embed import num_relative_distances, resize_abs_pos_embed
from mimkit.models.vit import ViTConfig, VisionTransformer

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
BEIT = dict(qkv_bias="qv", pos_embed="none", layer_scale_init=0.1)


def _randomize(model, seed=0):
    """Give zero-initialised tables / biases / gammas values, so a wrong load shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")) or "gamma" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _official_beit(model, v2=False):
    """The official BEiT pretraining layout: gamma_1/2, a saved index buffer, lm_head, under "model"."""
    sd = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v.clone() for k, v in model.state_dict().items()}
    n = model.rel_pos_bias.relative_position_index.shape[0]
    sd["rel_pos_bias.relative_position_index"] = torch.zeros(n, n, dtype=torch.long)
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(8192, 64), torch.zeros(8192)
    if v2:
        sd["cls_pt_layers.0.norm1.weight"] = torch.ones(64)
    return {"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1.5e-3, model="beit_base_patch16_224")}


def _official_mae(model, milan=False):
    """The MAE / MILAN pretraining layout: encoder keys plus decoder_* and a decoder-width mask token."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.randn(1, 1, 32)
    sd["decoder_embed.weight"] = torch.randn(32, 64)
    sd["decoder_pos_embed"] = torch.randn(1, 17, 32)
    if milan:
        sd["decoder_blocks.0.attn.q.weight"], sd["decoder_blocks.0.attn.kv.weight"] = torch.randn(32, 32), torch.randn(64, 32)
    else:
        sd["decoder_blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    sd["decoder_pred.weight"] = torch.randn(192, 32)
    return {"model": sd, "epoch": 1}


def _features(model, x):
    with torch.no_grad():
        return model.eval().forward_features(x)


def test_load_state_reads_safetensors_torch_files_and_export_folders(tmp_path):
    sd = {"a": torch.randn(3), "b": torch.arange(4)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save({"model": sd, "args": argparse.Namespace(x=1)}, tmp_path / "ckpt.pth")
    for loaded in (load_state(tmp_path / "model.safetensors"), load_state(tmp_path),
                   load_state(tmp_path / "ckpt.pth")["model"]):
        assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], sd["a"])


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_carrying_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsShell(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointFile, match="refused to unpickle.*GLOBAL"):
        load_state(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("v2", [False, True])
def test_official_beit_loads_into_a_per_block_finetune_model(v2):
    torch.manual_seed(0)
    source = _randomize(VisionTransformer(ViTConfig(img_size=32, **TINY, **BEIT, rel_pos="shared",
                                                    mask_token=True, rescale_init=True)))
    ckpt = _official_beit(source, v2=v2)
    assert detect_layout(ckpt) == ("beitv2" if v2 else "beit")
    x = torch.randn(2, 3, 32, 32)

    # Same size: the shared table becomes every block's table and the encoder computes the same thing.
    same = VisionTransformer(ViTConfig(img_size=32, **TINY, **BEIT, rel_pos="block"))
    report = load_into_vit(same, ckpt, verbose=False)
    assert report.missing == [] and report.unexpected == [] and report.resized == {}
    assert {"lm_head.weight", "mask_token"} <= set(report.dropped)
    assert ("cls_pt_layers.0.norm1.weight" in report.dropped) == v2
    assert any("expanded" in c for c in report.converted)
    torch.testing.assert_close(_features(same, x), _features(source, x))

    # Larger fine-tune size with mean pooling: tables resized per block, head and fc_norm fresh.
    big = VisionTransformer(ViTConfig(img_size=48, **TINY, **BEIT, rel_pos="block", global_pool="avg",
                                      num_classes=10))
    report = load_into_vit(big, ckpt, verbose=False)
    rows = num_relative_distances((6, 6))
    for i in range(2):
        table = big.blocks[i].attn.relative_position_bias_table
        assert table.shape == (rows, 4)
        src = source.rel_pos_bias.relative_position_bias_table
        torch.testing.assert_close(table[-3:], src[-3:])  # the cls entries are kept
        torch.testing.assert_close(table[5 * 11 + 5], src[3 * 7 + 3])  # offset (0, 0)
        assert f"blocks.{i}.attn.relative_position_bias_table" in report.resized
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert "norm.weight" in report.dropped and report.unexpected == []
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 10)


@pytest.mark.parametrize("milan", [False, True])
def test_mae_layout_loads_at_the_same_and_a_larger_size(milan):
    torch.manual_seed(0)
    source = VisionTransformer(ViTConfig(img_size=32, **TINY, pos_embed="sincos"))
    ckpt = _official_mae(source, milan=milan)
    assert detect_layout(ckpt) == ("milan" if milan else "mae")
    x = torch.randn(2, 3, 32, 32)

    same = VisionTransformer(ViTConfig(img_size=32, **TINY, pos_embed="learned"))
    report = load_into_vit(same, ckpt, verbose=False)
    assert report.missing == [] and report.unexpected == [] and report.resized == {}
    assert "mask_token" in report.dropped and "decoder_embed.weight" in report.dropped
    torch.testing.assert_close(_features(same, x), _features(source, x))

    big = VisionTransformer(ViTConfig(img_size=48, **TINY, pos_embed="learned", num_classes=7))
    report = load_into_vit(big, ckpt, verbose=False)
    assert big.pos_embed.shape == (1, 1 + 36, 64) and report.resized["pos_embed"] == "(1, 17, 64) -> (1, 37, 64)"
    torch.testing.assert_close(big.pos_embed[:, 0], source.pos_embed[:, 0])
    assert sorted(report.missing) == ["head.bias", "head.weight"]

    # A fixed sin-cos target keeps its own table for its grid.
    fixed = VisionTransformer(ViTConfig(img_size=48, **TINY, pos_embed="sincos"))
    table = fixed.pos_embed.clone()
    report = load_into_vit(fixed, ckpt, verbose=False)
    assert torch.equal(fixed.pos_embed, table) and report.missing == [] and "pos_embed" in report.dropped


def test_qkv_bias_loads_into_a_qv_model_exactly():
    # MAE's k bias is dropped: the output must not change (softmax ignores a per-query constant).
    torch.manual_seed(0)
    source = VisionTransformer(ViTConfig(img_size=32, **TINY))
    with torch.no_grad():
        for blk in source.blocks:
            blk.attn.qkv.bias.normal_()
    target = VisionTransformer(ViTConfig(img_size=32, **TINY, qkv_bias="qv"))
    report = load_into_vit(target, source.state_dict(), verbose=False)
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(target, x), _features(source, x), rtol=1e-5, atol=1e-5)


def test_timm_beit_and_prefixed_exports_load(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, **TINY, **BEIT, rel_pos="block")
    source = _randomize(VisionTransformer(cfg))
    x = torch.randn(2, 3, 32, 32)

    timm_sd = to_timm_beit_state_dict(source.state_dict())
    assert detect_layout(timm_sd) == "timm_beit"
    target = VisionTransformer(cfg)
    load_into_vit(target, timm_sd, verbose=False)
    torch.testing.assert_close(_features(target, x), _features(source, x))

    # A pretraining model's state: the encoder under module.encoder., a head beside it.
    wrapped = {f"module.encoder.{k}": v for k, v in source.state_dict().items()}
    wrapped["module.mim_head.weight"] = torch.randn(10, 64)
    save_file(wrapped, str(tmp_path / "model.safetensors"))
    target = VisionTransformer(cfg)
    report = load_checkpoint_into_vit(target, tmp_path, verbose=False)
    assert report.layout == "mimkit" and report.missing == [] and report.unexpected == []
    assert "mim_head.weight" in report.dropped
    torch.testing.assert_close(_features(target, x), _features(source, x))


def test_a_head_of_another_shape_is_dropped_and_reported(capsys):
    source = VisionTransformer(ViTConfig(img_size=32, **TINY, num_classes=5))
    target = VisionTransformer(ViTConfig(img_size=32, **TINY, num_classes=10))
    report = load_into_vit(target, source.state_dict())
    assert report.layout == "timm_vit"
    assert set(report.dropped) == {"head.weight", "head.bias"}
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert "head.weight" in capsys.readouterr().out


def test_a_different_architecture_fails_saying_what_differs():
    source = VisionTransformer(ViTConfig(img_size=32, **TINY))
    with pytest.raises(ValueError, match=r"embed_dim: checkpoint 64, model 96"):
        load_into_vit(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=4)),
                      source.state_dict(), verbose=False)
    with pytest.raises(ValueError, match=r"depth: checkpoint 2, model 3"):
        load_into_vit(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)),
                      source.state_dict(), verbose=False)
    beit = _randomize(VisionTransformer(ViTConfig(img_size=32, **TINY, **BEIT, rel_pos="block")))
    with pytest.raises(ValueError, match=r"num_heads: checkpoint 4, model 8"):
        load_into_vit(VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=8,
                                                  **BEIT, rel_pos="block")), beit.state_dict(), verbose=False)


def test_a_cls_model_loads_into_a_windowed_detection_backbone():
    torch.manual_seed(0)
    source = VisionTransformer(ViTConfig(img_size=32, **TINY))
    target = VisionTransformer(ViTConfig(img_size=48, **TINY, class_token=False, window_size=2, global_blocks=[1],
                                         rel_pos="block"))
    report = load_into_vit(target, source.state_dict(), verbose=False)
    assert target.pos_embed.shape == (1, 36, 64) and report.resized["pos_embed"] == "(1, 17, 64) -> (1, 36, 64)"
    assert report.dropped["cls_token"] == "target has no class token" and report.unexpected == []
    assert sorted(report.missing) == ["blocks.0.attn.relative_position_bias_table",
                                      "blocks.1.attn.relative_position_bias_table"]
    # The patch positions come from the source's patch rows only (its cls row is not among them).
    expected = resize_abs_pos_embed(source.pos_embed[:, 1:].detach(), (4, 4), (6, 6), num_prefix=0)
    torch.testing.assert_close(target.pos_embed.detach(), expected)


def test_load_vit_export_builds_the_recorded_architecture(tmp_path):
    import dataclasses
    import json

    from mimkit.checkpoint.load import load_vit_export

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=32, **TINY, **BEIT, rel_pos="shared", mask_token=True)
    source = _randomize(VisionTransformer(cfg))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "model.safetensors"))
    meta = {"architecture": dataclasses.asdict(cfg), "pixel_norm": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    (tmp_path / "mimkit.json").write_text(json.dumps(meta))

    model, info = load_vit_export(tmp_path)
    assert info["mean"] == [0.5] * 3 and info["std"] == [0.25] * 3 and info["report"].missing == []
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(_features(model, x), _features(source, x))
    # Fine-tuning overrides: larger images, per-block tables, a head.
    model, info = load_vit_export(tmp_path, img_size=48, rel_pos="block", mask_token=False, num_classes=4)
    assert model.blocks[1].attn.relative_position_bias_table.shape == (num_relative_distances((6, 6)), 4)
    assert sorted(info["report"].missing) == ["head.bias", "head.weight"]
    with pytest.raises(ValueError, match="img_sz"):
        load_vit_export(tmp_path, img_sz=48)
