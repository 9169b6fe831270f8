"""MILAN / MAE / EVA objectives: masks follow the teacher's attention, the teacher sees CLIP's
normalisation, losses are what the papers say, masks are reproducible on resume, the loss falls; the
presets load; and the real pretrain trainer on 2 DeepSpeed ranks: MILAN's loss falls, a killed run
resumes to the uninterrupted run's losses, the export is the encoder alone; MAE and EVA run end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.data.demo import make_demo_data
from mimkit.models.vit import preset
from mimkit.optim import resolve_lr
from mimkit.pretrain.config import PretrainConfig, load_pretrain_config
from mimkit.pretrain.eva import EvaConfig
from mimkit.pretrain.mae import MaeConfig
from mimkit.pretrain.milan import MilanConfig
from mimkit.pretrain.objectives import build_objective
from mimkit.pretrain.parts import MaskedRegression, cosine_distance, masked_regression, patchify
from mimkit.pretrain.trainer import mask_generator
from mimkit.runlog import read_metrics
from mimkit.teachers import TeacherConfig, build_teacher, tiny_open_clip_cfg

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "pretrain"
import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=4, decoder_mlp_ratio=2.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads per op
    make each step 10-40x slower (measured): one thread for this module's in-process tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(cfg_cls, mask_token=False, drop_path=0.0, **overrides):
    """The method's Objective on a tiny encoder (and a tiny random open_clip teacher where it has one)."""
    torch.manual_seed(0)
    method = cfg_cls(**{**SMALL_DECODER, **overrides})
    if method.target == "teacher":
        method.teacher = TeacherConfig(model_cfg=tiny_open_clip_cfg())
    cfg = PretrainConfig(model=preset("vit_tiny_cpu", pos_embed="sincos", mask_token=mask_token, drop_path=drop_path))
    return masked_regression(cfg, method)


def _prepared(objective, images, seed=0):
    """A batch as the trainer builds it: the targets, then the masks (with the targets' scores)."""
    batch = {"image": images}
    batch.update(objective.targets(batch))
    batch.update(objective.masks(images.shape[0], torch.Generator().manual_seed(seed), batch.get("scores")))
    return batch


def _normalised(raw):
    return (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _visible_frequency(objective, image, draws=600):
    out = _prepared(objective, image.expand(draws, -1, -1, -1).contiguous())
    assert out["ids_keep"].shape == (draws, 4) and torch.all(out["ids_keep"].diff(dim=1) > 0)
    assert torch.all((~out["mask"]).sum(1) == 4)
    return (~out["mask"]).float().mean(0).numpy(), out


def test_guided_masks_follow_the_teachers_attention():
    """Over many draws, high-attention patches are kept visible more often; uniform masking is the control."""
    milan = _tiny(MilanConfig)
    last = milan.targets.teacher.visual.transformer.resblocks[-1]
    with torch.no_grad():  # sharpen the random teacher's attention so it is far from uniform
        last.attn.in_proj_weight[:64] *= 6
    image = _normalised(torch.rand(1, 3, 32, 32))
    freq, out = _visible_frequency(milan, image)
    attention = out["scores"][0].numpy()
    assert attention.max() > 3 * attention.min()
    rho = _spearman(freq, attention)
    assert rho > 0.8, f"visible frequency does not follow attention: spearman {rho:.2f}"
    # it is sampling, not top-k: low-attention patches are still drawn sometimes
    assert freq.min() > 0

    uniform = _tiny(MilanConfig, mask_source="random")
    uniform.targets.teacher = milan.targets.teacher
    freq_uniform, _ = _visible_frequency(uniform, image)
    assert abs(_spearman(freq_uniform, attention)) < 0.6
    assert np.allclose(freq_uniform, 0.25, atol=0.08)


def test_teacher_receives_clip_normalisation_from_the_students_view():
    targets = _tiny(MilanConfig).targets
    seen = {}
    handle = targets.teacher.visual.conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    raw = torch.rand(2, 3, 32, 32)
    targets({"image": _normalised(raw)})
    handle.remove()
    clip_mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    clip_std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], (raw - clip_mean) / clip_std, atol=1e-5, rtol=1e-5)


def test_targets_are_teacher_tokens_with_cls():
    targets = _tiny(MilanConfig).targets
    image = _normalised(torch.rand(2, 3, 32, 32))
    out = targets({"image": image})
    expected = targets.teacher(image, source_mean=IMAGENET_MEAN, source_std=IMAGENET_STD).tokens
    assert out["target"].shape == (2, 17, 48)
    torch.testing.assert_close(out["target"], expected)


def test_masks_are_reproducible_after_restoring_state_and_differ_by_rank():
    """The trainer draws score-guided masks from a generator that is a function of (seed, rank, micro-batch
    index): a resumed run draws the same masks with no saved state, and ranks draw different ones."""
    milan = _tiny(MilanConfig)
    scores = torch.rand(4, 16)
    draw = lambda rank, index: milan.masks(4, mask_generator(0, rank, index), scores)["ids_keep"]  # noqa: E731
    assert torch.equal(draw(0, 7), draw(0, 7))
    assert not torch.equal(draw(0, 7), draw(0, 8))
    assert not torch.equal(draw(1, 7), draw(0, 7))


def test_cosine_loss_is_two_minus_two_cos_over_all_or_masked_tokens():
    x = torch.randn(1, 3, 8)
    assert torch.allclose(cosine_distance(x, 5 * x), torch.zeros(1, 3), atol=1e-6)
    assert torch.allclose(cosine_distance(x, -x), torch.full((1, 3), 4.0))
    model = MaskedRegression(torch.nn.Identity(), torch.nn.Identity(), "cosine", "all")
    pred = torch.stack([x[0, 0], x[0, 1], x[0, 2]])[None]            # [1, 1+2, 8]: CLS + 2 patches
    target = torch.stack([x[0, 0], -x[0, 1], x[0, 2]])[None]          # patch 0 wrong, rest right
    mask = torch.tensor([[True, False]])                                # patch 0 masked
    loss_all, _, _ = model.forward_loss(pred, target, mask)
    model.loss_on = "masked"
    loss_masked, _, _ = model.forward_loss(pred, target, mask)
    assert torch.isclose(loss_all, torch.tensor(4.0 / 3)) and torch.isclose(loss_masked, torch.tensor(4.0))


def test_mae_pixel_targets_are_normalised_patches_in_patch_order():
    mae = _tiny(MaeConfig)
    targets, model = mae.targets, mae.model
    assert not hasattr(targets, "teacher") and model.visible_only and not mae.masks.needs_scores
    image = torch.randn(2, 3, 32, 32)
    patches = patchify(image, 8)                                        # [2, 16, 192]
    torch.testing.assert_close(patches[1, 5], image[1, :, 8:16, 8:16].permute(1, 2, 0).reshape(-1))
    out = targets({"image": image})
    assert out["target"].shape == (2, 16, 192)
    torch.testing.assert_close(out["target"].mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_eva_encodes_every_position_with_block_masks():
    eva = _tiny(EvaConfig, mask_token=True, block_min_patches=2)
    assert not eva.model.visible_only
    out = _prepared(eva, torch.randn(3, 3, 32, 32))
    assert torch.all(out["mask"].sum(1) == 6)                          # 40% of 16, rounded
    with pytest.raises(ValueError, match="mask token"):
        _tiny(EvaConfig, mask_token=False)


@pytest.mark.parametrize("cfg_cls,mask_token", [(MilanConfig, False), (MaeConfig, False), (EvaConfig, True)])
def test_loss_falls_on_a_fixed_batch(cfg_cls, mask_token):
    overrides = {"block_min_patches": 2} if cfg_cls is EvaConfig else {}
    objective = _tiny(cfg_cls, mask_token=mask_token, **overrides)
    model = objective.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images = _normalised(torch.rand(8, 3, 32, 32))
    losses = []
    for step in range(15):
        out = model(_prepared(objective, images, seed=step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


def test_picture_shows_attention_visible_patches_and_error(tmp_path):
    milan = _tiny(MilanConfig)
    batch = _prepared(milan, _normalised(torch.rand(2, 3, 32, 32)))
    _, per_token, _ = milan.model.forward_loss(milan.model.predict(batch), batch["target"], batch["mask"])
    assert per_token[:, 1:].shape == (2, 16)  # the error per patch the picture shows
    milan.picture(milan.model, batch, tmp_path / "pictures" / "step_1.png")
    assert (tmp_path / "pictures" / "step_1.png").stat().st_size > 1000
    mae = _tiny(MaeConfig)  # pixel targets: the masked images and their reconstruction
    mae.picture(mae.model, _prepared(mae, _normalised(torch.rand(2, 3, 32, 32))), tmp_path / "mae.png")
    from PIL import Image

    width, height = Image.open(tmp_path / "mae.png").size  # 2 images a row: original, masked input, reconstruction
    assert (tmp_path / "mae.png").stat().st_size > 1000 and height * 2 == width * 3, (width, height)


def test_picture_leaves_the_training_rng_and_mode_alone(tmp_path):
    """The trainer draws a picture at a resumed run's first step: with drop path on, a forward in training
    mode there would consume RNG the uninterrupted run did not, and the resumed losses would drift."""
    milan = _tiny(MilanConfig, drop_path=0.5)
    batch = _prepared(milan, _normalised(torch.rand(2, 3, 32, 32)))
    state = torch.get_rng_state()
    milan.model.predict(batch)
    assert not torch.equal(torch.get_rng_state(), state)  # the control: drop path draws in training mode
    state = torch.get_rng_state()
    milan.picture(milan.model, batch, tmp_path / "p.png")
    assert torch.equal(torch.get_rng_state(), state) and milan.model.training


# ---- presets ---------------------------------------------------------------------------------------

MIM_PRESETS = sorted(p.name for p in PRESETS.glob("*.yaml") if p.name.startswith(("milan_", "mae_", "eva_")))
IMAGENET_TRAIN = 1_281_167


def test_the_presets_are_all_there():
    assert MIM_PRESETS == ["eva_tiny_cpu.yaml", "mae_tiny_cpu.yaml", "milan_tiny_cpu.yaml", "milan_vit_b16.yaml",
                           "milan_vit_l16.yaml"]


@pytest.mark.parametrize("engine, requested, expected", [
    ("fp32", "auto", torch.float32), ("bf16", "auto", torch.bfloat16), ("fp16", "auto", torch.bfloat16),
    ("bf16", "fp32", torch.float32)])
def test_the_teacher_runs_under_no_grad_in_the_trained_models_precision_unless_told(engine, requested, expected):
    cfg = load_pretrain_config(PRESETS / "milan_tiny_cpu.yaml", [f"engine.precision={engine}",
                                                                  f"method.teacher.precision={requested}"])
    teacher = build_objective(cfg).targets.teacher
    assert {p.dtype for p in teacher.parameters()} == {expected}
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = teacher(images)
    assert out.tokens.dtype == torch.float32 and not out.tokens.requires_grad  # no graph kept for targets


@pytest.mark.parametrize("name", MIM_PRESETS)
def test_preset_loads_with_every_section(name):
    cfg = load_pretrain_config(PRESETS / name)
    objective = name.split("_")[0]
    assert cfg.objective == objective
    assert cfg.model.pos_embed == "sincos" and cfg.engine.zero_stage in (1, 2)
    assert cfg.optim.base_batch_size == 256 and cfg.optim.weight_decay == 0.05 and cfg.optim.warmup_steps > 0
    section = cfg.method
    if name.endswith("_cpu.yaml"):
        assert cfg.engine.precision == "fp32" and cfg.model.img_size == cfg.data.image_size == 32
        assert cfg.run.steps <= 200 and cfg.run.export
        torch.manual_seed(0)
        built = build_objective(cfg)  # tiny random teacher: nothing downloaded
        assert built.second_view is None  # one view: no tokenizer view for these objectives
        assert tuple(built.masks.grid) == (4, 4) and built.model.encoder.embed_dim == 64
    else:  # the paper's recipe (MILAN)
        steps_per_epoch = IMAGENET_TRAIN // 4096
        assert cfg.run.steps == 400 * steps_per_epoch and cfg.optim.warmup_steps == 40 * steps_per_epoch
        assert cfg.data.batches_per_epoch == steps_per_epoch and cfg.engine.grad_accum == 1
        assert 4096 % cfg.data.batch_size == 0  # 4096 / batch_size ranks
        assert math.isclose(resolve_lr(cfg.optim.lr, 4096, cfg.optim.base_batch_size), 2.4e-3)
        assert tuple(cfg.optim.betas) == (0.9, 0.95) and cfg.optim.min_lr == 0.0
        assert cfg.engine.precision == "bf16" and cfg.model.img_size == 224 and cfg.model.patch_size == 16
        assert (section.mask_source, section.mask_ratio, section.target) == ("guided", 0.75, "teacher")
        assert (section.decoder, section.decoder_depth, section.decoder_dim) == ("prompting", 8, 512)
        assert (section.loss, section.loss_on) == ("cosine", "all")
        assert section.teacher.model_name == "ViT-B-16" and section.teacher.model_cfg is None
        assert section.teacher.pretrained == ""  # the user sets it: a random CLIP must never be the teacher
        with pytest.raises(ValueError, match="pretrained is empty"):
            build_teacher(section.teacher)  # refused before open_clip is touched


# ---- the real trainer on 2 ranks (DeepSpeed ZeRO-2 over gloo) ----------------------------------------
# Two launches in all. The first runs, one after the other in the same process group
# (tests/dist_scripts/run_milan.py): the uninterrupted MILAN reference, a few MAE and EVA steps, then a
# MILAN run that rank 1 SIGKILLs after step 5 (its last checkpoint is step 4); that kill ends the launch.
# The second resumes the killed run (resume: auto) to step 8.

STEPS, SAVE_EVERY, KILL_AT = 8, 4, 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("milan2r")
    data = make_demo_data(root / "demo", image_size=32, images_per_class=12, val_per_class=1, images_per_shard=16)
    return root, data.train_shard_pattern


def _args(demo, preset, name, **extra):
    root, shards = demo
    base = {"data.shards": shards, "run.root": root / "runs", "run.name": name, "run.log_every": 1,
            "data.num_workers": 0, "data.batch_size": 8, "data.batches_per_epoch": 5, "optim.warmup_steps": 1,
            "run.export": False}
    base.update(extra)
    return ["--config", PRESETS / preset, *(f"{k}={v}" for k, v in base.items())]


def _milan_args(demo, name, **extra):
    return _args(demo, "milan_tiny_cpu.yaml", name, **{"run.steps": STEPS, "run.save_every": SAVE_EVERY, **extra})


def _launch(demo, args, check):
    return _helper.run_torchrun(_helper.SCRIPTS / "run_milan.py", args, cwd=demo[0], timeout=300, check=check)


@pytest.fixture(scope="module")
def first_launch(demo):
    args = [*_milan_args(demo, "reference", **{"run.export": True}),
            "--then", *_args(demo, "mae_tiny_cpu.yaml", "mae", **{"run.steps": 3, "run.save_every": 3}),
            "--then", *_args(demo, "eva_tiny_cpu.yaml", "eva", **{"run.steps": 3, "run.save_every": 3}),
            "--then", *_milan_args(demo, "resumed", **{"debug.kill_at_step": KILL_AT})]
    proc = _launch(demo, args, check=False)
    return demo[0] / "runs", proc


def _ended(run_dir, proc):
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    assert records and records[-1].get("event") == "end", f"{run_dir.name} did not end:\n{proc.stdout[-6000:]}"
    return records


def losses_by_step(run_dir):
    """The last logged loss of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_two_rank_milan_loss_falls_and_export_is_encoder_only(first_launch):
    from safetensors.torch import load_file

    from mimkit.models.vit import VisionTransformer

    runs, proc = first_launch
    run_dir = runs / "reference"
    end = _ended(run_dir, proc)[-1]
    assert end["batches_per_rank"] == [STEPS, STEPS] and end["skipped_steps"] == 0
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS - 1] + losses[STEPS] < losses[1] + losses[2] - 0.3, losses  # 2 - 2 cos: ~2.0 -> ~1.5
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["objective"] == "milan" and env["world_size"] == 2 and env["zero_stage"] == 2
    assert list((run_dir / "pictures").glob("masks_*.png"))  # attention / visible patches / error picture

    cfg = load_pretrain_config(PRESETS / "milan_tiny_cpu.yaml")
    torch.manual_seed(0)  # the trainer's seed: the encoder's initial weights
    initial = VisionTransformer(cfg.model).state_dict()
    exported = load_file(str(run_dir / "export" / "model.safetensors"))
    assert set(exported) == set(initial)  # the student encoder, nothing else
    assert not any(k.startswith(("decoder", "teacher", "visual", "encoder.", "module.")) for k in exported)
    assert not torch.equal(exported["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])  # trained
    meta = json.loads((run_dir / "export" / "mimkit.json").read_text())
    assert meta["method"] == "milan" and meta["teacher"]["model_name"] == "tiny-random" and meta["step"] == STEPS


def test_two_rank_milan_killed_run_resumes_to_the_uninterrupted_losses(first_launch, demo):
    runs, proc = first_launch
    reference, run_dir = runs / "reference", runs / "resumed"
    _ended(reference, proc)
    assert proc.returncode != 0  # the kill ended the first launch
    last = read_metrics(run_dir)[-1]
    assert last["step"] == KILL_AT and "event" not in last, proc.stdout[-6000:]  # died before step 6's forward
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{SAVE_EVERY:08d}"

    proc = _launch(demo, _milan_args(demo, "resumed"), check=True)  # resume: auto, from step 4
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["resumed_from_step"] == SAVE_EVERY
    assert _ended(run_dir, proc)[-1]["batches_per_rank"] == [STEPS - SAVE_EVERY] * 2
    expected, resumed = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # exact (fp32): the same weights, optimizer state, data position and masks (a function of the
    # micro-batch index) as the uninterrupted run
    after = range(SAVE_EVERY + 1, STEPS + 1)
    assert [resumed[s] for s in after] == [expected[s] for s in after]


@pytest.mark.parametrize("objective", ["mae", "eva"])
def test_two_rank_objective_trains_through_the_trainer(first_launch, objective):
    runs, proc = first_launch
    run_dir = runs / objective
    records = _ended(run_dir, proc)
    assert records[-1]["batches_per_rank"] == [3, 3] and records[-1]["skipped_steps"] == 0
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    assert {"loss_masked", "loss_visible"} <= set(steps[-1])
    if objective == "mae":  # MSE on normalised pixels, masked patches only
        assert math.isclose(steps[0]["loss"], steps[0]["loss_masked"], rel_tol=1e-6) and 0.5 < steps[0]["loss"] < 3
    else:  # negative cosine on masked tokens
        assert math.isclose(steps[0]["loss"], steps[0]["loss_masked"], rel_tol=1e-6) and -1 <= steps[0]["loss"] <= 1
    assert json.loads((run_dir / "environment.json").read_text())["objective"] == objective
    assert (run_dir / "checkpoints" / "step_00000003" / "complete.json").is_file()
