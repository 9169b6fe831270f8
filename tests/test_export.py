"""`mimkit export`: ZeRO 0-3 checkpoints of 2-rank runs to the fp32 encoder export, timm file, refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from mimkit_test_distributed import run_torchrun  # tests/distributed.py, registered by conftest.py
from mimkit.checkpoint.export import ExportError, export_run, find_checkpoint, load_checkpoint_file, main, \
    run_export_meta, timm_spec, to_timm_state
from mimkit.cli import main as mimkit_main
from mimkit.models.vit import VisionTransformer, ViTConfig, preset

SCRIPT = Path(__file__).parent / "dist_scripts_ft" / "make_zero_runs.py"
STAGES = ["1:fp32", "2:fp32", "3:fp32"]  # stage 0 fp32 keeps full weights: the trivial path


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> Path:
    """One torchrun (2 CPU ranks) that trains and saves a tiny run per ZeRO stage."""
    root = tmp_path_factory.mktemp("zero_runs")
    run_torchrun(SCRIPT, [str(root), *STAGES], cwd=root, timeout=540)
    return root


def _live_encoder(run: Path) -> dict[str, torch.Tensor]:
    live = load_file(str(run / "live.safetensors"))
    return {k[len("encoder."):]: v for k, v in live.items() if k.startswith("encoder.")}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_export_equals_live_fp32_weights(zero_runs, stage):
    run = zero_runs / f"zero{stage}_fp32"
    out = export_run(run)
    exported = load_file(str(out / "model.safetensors"))
    live = _live_encoder(run)
    assert set(exported) == set(live)  # encoder only: no decoder, no prefix
    assert not any(k.startswith(("module.", "encoder.", "decoder")) for k in exported)
    for key in live:
        assert exported[key].dtype == torch.float32
        assert torch.equal(exported[key], live[key]), key
    # Training moved the weights: the comparison above could have failed.
    fresh = VisionTransformer(preset("vit_tiny_cpu", pos_embed="sincos", layer_scale_init=0.1)).state_dict()
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])
    # The frozen sin-cos table (not in the optimizer; ZeRO-1 does not even list it) is there, exact.
    assert torch.equal(exported["pos_embed"], fresh["pos_embed"])

    meta = json.loads((out / "mimkit.json").read_text())
    assert meta["architecture"]["embed_dim"] == 64 and meta["architecture"]["pos_embed"] == "sincos"
    assert meta["method"] == "mae" and meta["step"] == 3 and meta["samples_seen"] == 12
    assert meta["pixel_norm"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["source"]["zero_stage"] == stage and meta["source"]["world_size"] == 2


def test_timm_export_gives_the_same_outputs(zero_runs, tmp_path):
    run = zero_runs / "zero2_fp32"
    assert main([str(run), "--timm", "--out", str(tmp_path / "export")]) == 0
    meta = json.loads((tmp_path / "export" / "mimkit.json").read_text())
    ref = timm.create_model(meta["timm"]["model_name"], pretrained=False, **meta["timm"]["kwargs"]).eval()
    ref.load_state_dict(load_file(str(tmp_path / "export" / meta["timm"]["file"])), strict=True)
    ours = VisionTransformer(ViTConfig(**meta["architecture"])).eval()
    ours.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_features(x), ours.forward_features(x), rtol=1e-5, atol=1e-5)


def test_beit_architecture_maps_to_timm_beit():
    torch.manual_seed(0)
    cfg = preset("beit_tiny_cpu", global_pool="avg")
    ours = VisionTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                p.normal_()
    spec = timm_spec(cfg)
    ref = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).eval()
    ref.load_state_dict(to_timm_state(ours.state_dict(), spec), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   ours.forward_head(ours.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)


def test_unfinished_checkpoints_are_refused(zero_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero_runs / "zero2_fp32", run)
    tag = run / "checkpoints" / "step_00000003"
    # a missing optimizer partition
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    next((broken / "checkpoints" / "step_00000003").glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ExportError, match="incomplete|missing"):  # named by the verification, or by the count
        export_run(broken)
    # a half-written save (no completion marker) and an unknown step
    (tag / "complete.json").unlink()
    with pytest.raises(ExportError, match="not a finished checkpoint"):
        find_checkpoint(run)
    # `mimkit export`: one line, exit 2 (a user error)
    assert mimkit_main(["export", str(run), "--step", "7"]) == 2
    assert capsys.readouterr().err.startswith("mimkit export: no checkpoint for step 7")
    # not a run folder at all
    assert mimkit_main(["export", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_carrying_code_is_refused(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "evil": _Payload()}, path)
    with pytest.raises(ExportError, match="refused to unpickle"):
        load_checkpoint_file(path)


def test_export_meta_comes_from_the_checkpoint_or_export_refuses(tmp_path):
    tag = tmp_path / "checkpoints" / "step_00000003"
    with pytest.raises(ExportError, match=r"step_00000003.*'export_meta'"):
        run_export_meta({"samples": 12}, tag)
    with pytest.raises(ExportError, match=r"missing \['teacher'\]"):
        run_export_meta({"export_meta": {"method": "beit", "tokenizer": None}}, tag)
    with pytest.raises(ExportError, match="computes itself"):
        run_export_meta({"export_meta": {"method": "mae", "tokenizer": None, "teacher": None, "step": 1}}, tag)
    given = {"method": "milan", "tokenizer": None, "teacher": {"kind": "vit_export"}, "note": "kept"}
    assert run_export_meta({"export_meta": given}, tag) == given  # verbatim, extra fields included
