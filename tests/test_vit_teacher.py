"""ViTExportTeacher: a mimkit ViT export (a tiny BEiT-style encoder, shared or per-block rel-pos tables) as
MILAN's teacher. Its tokens are the encoder's forward_features on the export's normalisation, its CLS
attention is the last block's softmax with the rel-pos bias (checked by hand and against the block's own
attention output), both input paths agree, it stays frozen; MILAN builds it from `teacher.kind: vit_export`,
records the absolute path, and the demo preset matches the demo BEiT run's geometry."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mimkit.config import load_config
from mimkit.models.clip_teacher import TeacherOutput
from mimkit.models.pos_embed import relative_position_index
from mimkit.models.vit import ViTConfig, VisionTransformer, preset
from mimkit.models.vit_teacher import ViTExportTeacher
from mimkit.pretrain.config import PretrainConfig
from mimkit.pretrain.milan import MilanConfig, TeacherConfig, build_parts, build_teacher
from mimkit.pretrain.trainer import export_meta_from_config

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXPORT_MEAN, EXPORT_STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)  # not ImageNet's: the renormalisation shows


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _beit_cfg(rel_pos: str = "shared", **overrides) -> ViTConfig:
    return ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, qkv_bias="qv",
                     pos_embed="none", rel_pos=rel_pos, layer_scale_init=0.1, mask_token=True, rescale_init=True,
                     **overrides)


def _write_export(path: Path, cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A randomised encoder written the way `mimkit export` writes one (model.safetensors + mimkit.json).
    Every parameter is random, the q / v biases and rel-pos tables included (they start at zero)."""
    torch.manual_seed(seed)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                # BEiT's CLS query has one entry for every patch key (row -3, cls->token) and one for itself
                # (row -1, cls->cls): the bias moves mass between the CLS key and the patches, differently per
                # head. Strong, head-dependent values there make leaving the bias out visible in the head mean.
                p.normal_(0, 1.0)
                p[-1] = torch.tensor([4.0, -4.0, 2.0, -2.0])
                p[-3] = torch.tensor([-1.0, 1.0, 0.0, 0.5])
            elif name.endswith(("q_bias", "v_bias", "gamma")) or name.startswith("norm"):
                p.normal_(0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    meta = {"format": "mimkit-export", "version": 1, "architecture": dataclasses.asdict(cfg),
            "pixel_norm": {"mean": list(EXPORT_MEAN), "std": list(EXPORT_STD), "image_size": cfg.img_size,
                           "interpolation": "bicubic"},
            "method": "beit", "tokenizer": "runs/tok/export", "teacher": None, "step": 7}
    (path / "mimkit.json").write_text(json.dumps(meta))
    return model.eval()


@pytest.fixture(scope="module", params=["shared", "block"])
def exported(request, tmp_path_factory):
    """(export folder, the source encoder, the teacher): shared table (BEiT pretraining) and per-block tables."""
    path = tmp_path_factory.mktemp(f"beit_{request.param}") / "export"
    source = _write_export(path, _beit_cfg(request.param))
    return path, source, ViTExportTeacher(path)


def _normalise(raw, mean, std):
    return (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_tokens_are_the_encoders_normed_output_with_cls(exported):
    _, source, teacher = exported
    raw = torch.rand(3, 3, 32, 32)
    out = teacher(raw)
    assert isinstance(out, TeacherOutput)
    assert out.tokens.shape == (3, 1 + 16, 32) and out.cls_attention.shape == (3, 16)
    assert teacher.output_dim == 32 and teacher.grid == (4, 4) and teacher.image_size == (32, 32)
    with torch.no_grad():
        expected = source.forward_features(_normalise(raw, EXPORT_MEAN, EXPORT_STD))  # [B, 1+N, D], final norm
    torch.testing.assert_close(out.tokens, expected, atol=1e-5, rtol=1e-5)
    # The control: ImageNet statistics (load_vit_export's fallback) would give other tokens.
    with torch.no_grad():
        wrong = source.forward_features(_normalise(raw, IMAGENET_MEAN, IMAGENET_STD))
    assert (out.tokens - wrong).abs().max() > 1e-2


def _hand_cls_attention(source: VisionTransformer, x: torch.Tensor, with_bias: bool = True):
    """The last block's full attention, written out: softmax(q k^T / sqrt(d) + rel-pos bias) over all keys.
    Returns (CLS row, patch columns, head mean [B, N]; the block's attention output from these weights)."""
    blk = source.blocks[-1]
    attn = blk.attn
    h = blk.norm1(x)
    B, L, D = h.shape
    H, d = attn.num_heads, D // attn.num_heads
    q = h @ attn.qkv.weight[:D].T + attn.q_bias
    k = h @ attn.qkv.weight[D:2 * D].T                                  # BEiT: no k bias
    v = h @ attn.qkv.weight[2 * D:].T + attn.v_bias
    split = lambda t: t.reshape(B, L, H, d).transpose(1, 2)             # noqa: E731  [B, H, L, d]
    logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d)       # [B, H, L, L]
    if with_bias:
        index = relative_position_index(source.grid_size)               # [L, L], cls at 0
        tables = [t for t in (getattr(source.rel_pos_bias, "relative_position_bias_table", None),
                              attn.relative_position_bias_table) if t is not None]
        assert tables, "the test encoder must carry a rel-pos table"
        for table in tables:
            logits = logits + table[index.reshape(-1)].reshape(L, L, H).permute(2, 0, 1)[None]
    probs = logits.softmax(-1)
    out = attn.proj((probs @ split(v)).transpose(1, 2).reshape(B, L, D))
    return probs[:, :, 0, 1:].mean(1), out


def test_cls_attention_is_the_last_blocks_softmax_with_the_rel_pos_bias(exported):
    _, source, teacher = exported
    raw = torch.rand(2, 3, 32, 32)
    seen = {}
    last = source.blocks[-1]
    handle = last.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            source.forward_features(_normalise(raw, EXPORT_MEAN, EXPORT_STD))
    finally:
        handle.remove()
    with torch.no_grad():
        expected, attn_out = _hand_cls_attention(source, seen["x"])
        # The hand computation is the block's: its attention output from these weights is the module's.
        shared = source.rel_pos_bias(None, True) if source.rel_pos_bias is not None else None
        torch.testing.assert_close(attn_out, last.attn(last.norm1(seen["x"]), shared, None, True), atol=1e-5, rtol=1e-4)
        no_bias, _ = _hand_cls_attention(source, seen["x"], with_bias=False)
    out = teacher(raw)
    torch.testing.assert_close(out.cls_attention, expected, atol=1e-5, rtol=1e-4)
    assert (out.cls_attention - no_bias).abs().max() > 1e-2  # the bias matters here: leaving it out is caught
    assert torch.all(out.cls_attention > 0) and torch.all(out.cls_attention.sum(-1) < 1)  # CLS key excluded


def test_both_input_paths_give_the_exports_normalisation(exported):
    _, _, teacher = exported
    raw = torch.rand(2, 3, 32, 32)
    seen = {}
    handle = teacher.encoder.patch_embed.register_forward_pre_hook(
        lambda m, args: seen.setdefault("x", []).append(args[0].detach().clone()))
    try:
        out_raw = teacher(raw)
        out_student = teacher(_normalise(raw, IMAGENET_MEAN, IMAGENET_STD), source_mean=IMAGENET_MEAN,
                              source_std=IMAGENET_STD)
    finally:
        handle.remove()
    from_raw, from_student = seen["x"]
    torch.testing.assert_close(from_raw, _normalise(raw, EXPORT_MEAN, EXPORT_STD), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_student, from_raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_student.tokens, out_raw.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_student.cls_attention, out_raw.cls_attention, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="both"):
        teacher(raw, source_mean=IMAGENET_MEAN)


def test_frozen_eval_no_grad_resizes_and_meta(exported):
    path, _, teacher = exported
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.encoder.training
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to the encoder's 32 px
    out = teacher(images)
    assert out.tokens.shape == (2, 17, 32) and not out.tokens.requires_grad and not out.cls_attention.requires_grad
    meta = teacher.meta
    assert meta["kind"] == "vit_export" and meta["export"] == str(path.resolve()) and meta["method"] == "beit"
    assert meta["mean"] == pytest.approx(EXPORT_MEAN) and meta["output_dim"] == 32


def test_runs_in_its_own_dtype_returns_float32(tmp_path):
    _write_export(tmp_path / "export", _beit_cfg())
    teacher = ViTExportTeacher(tmp_path / "export", precision="bf16")
    assert teacher.encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    seen = {}
    handle = teacher.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    out = teacher(torch.rand(2, 3, 32, 32))
    handle.remove()
    assert seen["x"].dtype == torch.bfloat16
    assert out.tokens.dtype == torch.float32 and out.cls_attention.dtype == torch.float32


def test_refuses_exports_it_cannot_teach_with(tmp_path):
    _write_export(tmp_path / "nocls", ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                                 class_token=False, global_pool="avg"))
    with pytest.raises(ValueError, match="class token"):
        ViTExportTeacher(tmp_path / "nocls")
    with pytest.raises(FileNotFoundError):
        ViTExportTeacher(tmp_path / "nothing")


# ---- MILAN: teacher.kind ----------------------------------------------------------------------------------


def test_milan_builds_the_export_teacher_and_trains_on_its_targets(tmp_path, monkeypatch):
    source = _write_export(tmp_path / "beit" / "export", _beit_cfg())
    monkeypatch.chdir(tmp_path)
    cfg = MilanConfig(teacher=TeacherConfig(kind="vit_export", export="beit/export"), decoder_dim=32,
                      decoder_depth=1, decoder_heads=4, decoder_mlp_ratio=2.0)
    torch.manual_seed(0)
    student = VisionTransformer(preset("vit_tiny_cpu", pos_embed="sincos"))
    model, targets = build_parts(cfg, student, IMAGENET_MEAN, IMAGENET_STD)
    assert isinstance(targets.teacher, ViTExportTeacher)
    assert cfg.teacher.export == str((tmp_path / "beit" / "export").resolve())  # what config.yaml / export record
    raw = torch.rand(4, 3, 32, 32)
    batch = {"image": _normalise(raw, IMAGENET_MEAN, IMAGENET_STD)}
    t = targets(batch)
    with torch.no_grad():
        expected = source.forward_features(_normalise(raw, EXPORT_MEAN, EXPORT_STD))
    torch.testing.assert_close(t["target"], expected, atol=1e-5, rtol=1e-5)
    assert t["ids_keep"].shape == (4, 4) and t["cls_attention"].shape == (4, 16)
    out = model(batch, t)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.decoder is not None
    assert not any(p.grad is not None for p in targets.teacher.parameters())


def test_build_teacher_refuses_ambiguous_or_missing_teachers(tmp_path):
    with pytest.raises(ValueError, match="teacher.export is empty"):
        build_teacher(TeacherConfig(kind="vit_export"))
    with pytest.raises(FileNotFoundError, match="not a mimkit export"):
        build_teacher(TeacherConfig(kind="vit_export", export=str(tmp_path)))
    with pytest.raises(ValueError, match="only read with teacher.kind=vit_export"):
        build_teacher(TeacherConfig(export=str(tmp_path)))  # kind forgotten: never a silent open_clip teacher
    with pytest.raises(ValueError, match="unknown teacher.kind"):
        build_teacher(TeacherConfig(kind="clip"))


def test_the_export_of_a_milan_run_names_the_vit_export_teacher(tmp_path):
    """What `mimkit export` writes as `teacher` for a MILAN run whose teacher is an export: kind and path."""
    _write_export(tmp_path / "beit", _beit_cfg())
    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "demo_milan_cpu.yaml",
                      [f"milan.teacher.export={tmp_path / 'beit'}"])
    build_teacher(cfg.milan.teacher)
    teacher = export_meta_from_config(cfg)["teacher"]
    assert teacher["kind"] == "vit_export" and teacher["export"] == str((tmp_path / "beit").resolve())


def test_demo_preset_matches_the_demo_beit_geometry():
    pre = ROOT / "configs" / "pretrain"
    cfg = load_config(PretrainConfig, pre / "demo_milan_cpu.yaml")
    beit_preset = pre / "demo_beit_cpu.yaml" if (pre / "demo_beit_cpu.yaml").is_file() else pre / "beit_tiny_cpu.yaml"
    beit = load_config(PretrainConfig, beit_preset)
    assert cfg.objective == "milan" and cfg.milan.teacher.kind == "vit_export"
    assert cfg.model.img_size == cfg.data.image_size == beit.model.img_size == beit.data.image_size
    assert cfg.model.patch_size == beit.model.patch_size
    assert cfg.data.mean == beit.data.mean and cfg.data.std == beit.data.std
    assert cfg.engine.precision == "fp32" and 150 <= cfg.run.steps <= 300 and cfg.run.export
    assert cfg.model.pos_embed == "sincos" and cfg.milan.mask_source == "guided" and cfg.milan.target == "clip"
