"""CLIPTeacher: targets equal open_clip's own outputs, CLS attention equals the block's softmax, inputs get
CLIP's normalisation whatever the caller's, and the teacher stays frozen in its own dtype."""

import json

import pytest
import torch

from mimkit.teachers import CLIPTeacher, tiny_open_clip_cfg

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return CLIPTeacher(model_cfg=tiny_open_clip_cfg(image_size=32, patch_size=8, width=64, layers=2))


def _capture_input(module):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].detach().clone()))
    return seen, handle


def test_tokens_are_projected_normed_outputs_with_cls(teacher):
    images = torch.rand(3, 3, 32, 32)
    out = teacher(images)
    assert out.tokens.shape == (3, 1 + 16, teacher.output_dim) and teacher.grid == (4, 4)
    v = teacher.visual
    x = teacher.to_clip_space(images)
    pooled = v(x)  # open_clip: CLS after ln_post, times proj
    torch.testing.assert_close(out.tokens[:, 0], pooled, atol=1e-5, rtol=1e-5)
    v.output_tokens = True
    try:
        _, patch_tokens = v(x)  # normed, not projected
    finally:
        v.output_tokens = False
    torch.testing.assert_close(out.tokens[:, 1:], patch_tokens @ v.proj, atol=1e-5, rtol=1e-5)


def test_cls_attention_matches_multihead_attention_weights(teacher):
    images = torch.rand(2, 3, 32, 32)
    last = teacher.visual.transformer.resblocks[-1]
    seen, handle = _capture_input(last)
    try:
        out = teacher(images)
    finally:
        handle.remove()
    h = last.ln_1(seen["x"])
    _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)  # [B, L, L]
    torch.testing.assert_close(out.cls_attention, weights[:, 0, 1:], atol=1e-5, rtol=1e-4)
    assert out.cls_attention.shape == (2, 16)
    assert torch.all(out.cls_attention.sum(-1) < 1) and torch.all(out.cls_attention > 0)


def test_teacher_receives_clip_normalisation_from_either_input_space(teacher):
    raw = torch.rand(2, 3, 32, 32)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    seen, handle = _capture_input(teacher.visual.conv1)
    try:
        out_raw = teacher(raw)
        from_raw = seen["x"]
        student_view = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        out_student = teacher(student_view, source_mean=IMAGENET_MEAN, source_std=IMAGENET_STD)
        from_student = seen["x"]
    finally:
        handle.remove()
    torch.testing.assert_close(from_raw, (raw - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_student, from_raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_student.tokens, out_raw.tokens, atol=1e-4, rtol=1e-4)


def test_normalisation_comes_from_the_models_preprocess_cfg():
    cfg = tiny_open_clip_cfg()
    cfg["preprocess_cfg"] = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    t = CLIPTeacher(model_cfg=cfg)
    seen, handle = _capture_input(t.visual.conv1)
    raw = torch.rand(1, 3, 32, 32)
    t(raw)
    handle.remove()
    torch.testing.assert_close(seen["x"], (raw - 0.5) / 0.25)


def test_frozen_eval_no_grad_and_resizes(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    images = torch.rand(2, 3, 48, 48, requires_grad=True)  # resized to the tower's 32 px
    out = teacher(images)
    assert out.tokens.shape[1] == 17 and not out.tokens.requires_grad


def test_runs_in_its_own_dtype_returns_float32():
    t = CLIPTeacher(model_cfg=tiny_open_clip_cfg(), precision="bf16")
    assert t.visual.conv1.weight.dtype == torch.bfloat16
    seen, handle = _capture_input(t.visual.transformer.resblocks[0])
    out = t(torch.rand(2, 3, 32, 32))
    handle.remove()
    assert seen["x"].dtype == torch.bfloat16
    assert out.tokens.dtype == torch.float32 and out.cls_attention.dtype == torch.float32


def test_named_model_with_weights_from_a_local_file(tmp_path):
    """The user's path: an open_clip model name (here a registered tiny config) + a checkpoint file."""
    import open_clip

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mimkit-test-tiny.json").write_text(json.dumps(tiny_open_clip_cfg()))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(1)
    source = open_clip.create_model("mimkit-test-tiny")
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), ckpt)
    t = CLIPTeacher("mimkit-test-tiny", pretrained=str(ckpt))
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(t(images).tokens[:, 0], source.visual(t.to_clip_space(images)), atol=1e-5, rtol=1e-5)
    assert t.meta["pretrained"] == str(ckpt) and t.meta["model_name"] == "mimkit-test-tiny"


# ---- the one teacher config -------------------------------------------------------------------------------


def test_model_cfg_inline_or_as_a_json_file_builds_the_same_teacher(tmp_path):
    from omegaconf import OmegaConf

    from mimkit.teachers import Teacher, TeacherConfig, build_teacher, resolve_model_cfg

    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_open_clip_cfg()))
    images = torch.rand(2, 3, 32, 32)
    outs = []
    for model_cfg in (tiny_open_clip_cfg(), str(path), OmegaConf.create(tiny_open_clip_cfg())):
        torch.manual_seed(0)
        teacher = build_teacher(TeacherConfig(model_cfg=model_cfg))
        assert isinstance(teacher, CLIPTeacher) and isinstance(teacher, Teacher)
        outs.append(teacher(images))
    for out in outs[1:]:
        torch.testing.assert_close(out.tokens, outs[0].tokens)
    assert resolve_model_cfg(None) is None
    with pytest.raises(FileNotFoundError, match="perceptual.teacher.model_cfg=nope.json"):
        build_teacher(TeacherConfig(model_cfg="nope.json"), "perceptual.teacher")
    with pytest.raises(ValueError, match="perceptual.teacher.precision='fp8'"):
        build_teacher(TeacherConfig(model_cfg=tiny_open_clip_cfg(), precision="fp8"), "perceptual.teacher")


def test_presets_give_model_cfg_inline_and_as_a_file():
    """MILAN's tiny preset writes the tiny model inline, the tokenizer presets name open_clip_tiny.json:
    the same schema reads both, and they are the same model."""
    from pathlib import Path

    from mimkit.config import ConfigError, load_config
    from mimkit.pretrain.config import load_pretrain_config
    from mimkit.teachers import resolve_model_cfg
    from mimkit.tokenizers.config import TokenizerTrainConfig

    root = Path(__file__).resolve().parents[1]
    milan = load_pretrain_config(root / "configs" / "pretrain" / "milan_tiny_cpu.yaml").method.teacher
    vqkd = load_config(TokenizerTrainConfig, root / "configs" / "tokenizers" / "vqkd_tiny_cpu.yaml").teacher
    peco = load_config(TokenizerTrainConfig, root / "configs" / "tokenizers" / "peco_tiny_cpu.yaml").perceptual.teacher
    assert isinstance(milan.model_cfg, dict) and vqkd.model_cfg == peco.model_cfg == "configs/tokenizers/open_clip_tiny.json"
    assert resolve_model_cfg(milan.model_cfg) == resolve_model_cfg(root / vqkd.model_cfg)
    with pytest.raises((ValueError, ConfigError), match="perceptual.teacher.kind 'clip'"):
        load_config(TokenizerTrainConfig, root / "configs" / "tokenizers" / "peco_tiny_cpu.yaml",
                    ["perceptual.teacher.kind=clip"])
