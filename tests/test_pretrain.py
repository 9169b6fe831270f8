"""BEiT-family pretraining: the objectives on their own, then the real loop on 2 CPU ranks (DeepSpeed
over gloo): loss falls, a NaN step is skipped on both ranks, uneven shards give equal batch counts, a
SIGKILLed rank ends the run, and the resumed run repeats the uninterrupted one's losses exactly."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from mimkit.data.demo import make_demo_data
from mimkit.checkpoint.tokenizer_export import save_random_tokenizer_export
from mimkit.pretrain.config import load_pretrain_config
from mimkit.pretrain.objectives import build_objective
from mimkit.runlog import read_metrics

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "pretrain" / "beit_tiny_cpu.yaml"
import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tok = save_random_tokenizer_export(root / "tok", "dvae", input_size=32, seed=3)
    # 50 images a shard over 192 images: shards of 50, 50, 50, 42 -> uneven for 2 ranks
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    return root, tok, demo


def overrides(assets, name, **extra):
    root, tok, demo = assets
    base = {"data.shards": str(demo.shards_dir), "method.tokenizer": str(tok), "run.root": str(root / "runs"),
            "run.name": name, "run.log_every": 1, "data.num_workers": 0, "data.batches_per_epoch": 5,
            "data.batch_size": 8, "optim.warmup_steps": 2, "run.export": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(assets, name, timeout=240, check=True, **extra):
    root = assets[0]
    args = ["--config", PRESET, *overrides(assets, name, **extra)]
    return _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py", args, cwd=root, timeout=timeout, check=check)


def losses_by_step(run_dir):
    """The last logged loss of each step (a resumed run logs its steps again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# ---- the objectives alone -------------------------------------------------------------------------


def _cfg(assets, objective):
    extra = {"method.early_layer": 1} if objective == "beitv2" else {}
    return load_pretrain_config(PRESET, overrides(assets, "unit", objective=objective, **extra))


def _batch(objective, seed=0):
    """A batch as the trainer builds it: the stream's views and masks, then the targets."""
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "image_tok": torch.randn(4, 3, 32, 32, generator=g)}
    batch.update(objective.masks(4, g))
    batch.update(objective.targets(batch))
    return batch


def test_beit_loss_is_ce_over_masked_patches_only(assets):
    torch.manual_seed(0)
    cfg = _cfg(assets, "beit")
    objective = build_objective(cfg)
    model = objective.model
    assert objective.second_view.size == 32 and not objective.masks.needs_scores
    batch = _batch(objective)
    assert batch["mask"].shape == (4, 16) and (batch["mask"].sum(1) == 6).all()
    t = {"ids": batch["ids"]}
    assert t["ids"].shape == (4, 16) and t["ids"].dtype == torch.long
    out = model(batch)
    tokens = model.encoder.forward_features(batch["image"], mask=batch["mask"])[:, 1:]
    logits = model.lm_head(tokens)
    expected = torch.nn.functional.cross_entropy(logits[batch["mask"]], t["ids"][batch["mask"]])
    torch.testing.assert_close(out["loss"], expected)
    # unmasked positions do not count: changing their targets changes nothing
    t2 = {"ids": torch.where(batch["mask"], t["ids"], (t["ids"] + 1) % 64)}
    torch.testing.assert_close(model({**batch, **t2})["loss"], out["loss"])
    assert 0.0 <= float(out["mlm_acc"]) <= 1.0


def test_beitv2_adds_a_cls_head_term_logged_apart(assets):
    torch.manual_seed(0)
    objective = build_objective(_cfg(assets, "beitv2"))
    model = objective.model
    assert len(model.cls_pt_layers) == 2
    out = model(_batch(objective))
    torch.testing.assert_close(out["loss"], out["loss_mim"] + out["loss_cls_head"])
    assert not torch.equal(out["loss_mim"], out["loss_cls_head"])
    # the head's gradient reaches the final CLS token through its first input
    out["loss_cls_head"].backward()
    assert model.encoder.cls_token.grad is not None and model.encoder.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("engine, requested, expected", [
    ("fp32", "auto", torch.float32), ("bf16", "auto", torch.bfloat16), ("bf16", "fp32", torch.float32)])
def test_the_frozen_tokenizer_runs_in_the_trained_models_precision_unless_told(assets, engine, requested, expected):
    cfg = _cfg(assets, "beit")
    cfg.engine.precision, cfg.method.tokenizer_precision = engine, requested
    objective = build_objective(cfg)
    assert {p.dtype for p in objective.targets.tokenizer.model.parameters()} == {expected}
    ids = objective.targets({"image_tok": torch.randn(2, 3, 32, 32, requires_grad=True)})["ids"]
    assert ids.dtype == torch.long and not ids.requires_grad


def test_tokenizer_grid_must_match_the_patch_grid(assets):
    cfg = _cfg(assets, "beit")
    cfg.model.patch_size = 16  # 2x2 patches vs the tokenizer's 4x4 ids
    with pytest.raises(ValueError, match="grid"):
        build_objective(cfg)


# ---- the loop on 2 ranks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(assets):
    """12 steps uninterrupted; a NaN loss on rank 1 at step index 6; checkpoints every 4 steps."""
    out = launch(assets, "full", **{"run.steps": 12, "run.save_every": 4, "debug.nan_at_step": 6, "debug.nan_rank": 1})
    (assets[0] / "runs" / "full" / "launch.log").write_text(out.stdout)
    return assets[0] / "runs" / "full"


def test_the_first_step_says_which_attention_kernel_model_and_tokenizer_get(full_run):
    lines = [line for line in (full_run / "launch.log").read_text().splitlines() if "attention kernels" in line]
    # once (rank 0, first micro-batch); the 2-block encoder's calls, by torch's own choice on this CPU;
    # the dVAE tokenizer has no attention
    assert len(lines) == 1 and "(cpu, fp32)" in lines[0], lines
    assert re.search(r"model (FLASH_ATTENTION|EFFICIENT_ATTENTION|MATH) x2; targets no attention calls", lines[0])


def test_loss_falls_and_nan_step_is_skipped_on_both_ranks(full_run):
    records = read_metrics(full_run)
    losses = losses_by_step(full_run)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < 0.7 * sum(losses[s] for s in (1, 2, 3)) / 3
    skipped = {r["step"]: r["skipped_steps"] for r in records if "loss" in r}
    assert [skipped[s] for s in range(1, 13)] == [0] * 6 + [1] * 6  # counted once, by the rank-agreed flag
    end = records[-1]
    assert end["event"] == "end" and end["skipped_steps"] == 1
    # uneven shards (50, 50, 50, 42 images), 5 batches an epoch, 12 steps: both ranks got 12 batches
    assert end["batches_per_rank"] == [12, 12]
    env = json.loads((full_run / "environment.json").read_text())
    assert env["world_size"] == 2 and env["zero_stage"] == 2 and env["torch"] == torch.__version__
    assert (full_run / "config.yaml").is_file() and list((full_run / "pictures").glob("masks_*.png"))
    assert sorted(p.name for p in (full_run / "checkpoints").glob("step_*")) == ["step_00000008", "step_00000012"]


def test_sigkill_on_one_rank_ends_the_run_and_resume_repeats_the_losses(assets, full_run):
    run_dir = assets[0] / "runs" / "killed"
    common = {"run.steps": 12, "run.save_every": 4, "debug.nan_at_step": 6, "debug.nan_rank": 1}
    proc = launch(assets, "killed", check=False, timeout=180, **common, **{"debug.kill_at_step": 9})
    ended = time.time()
    assert proc.returncode != 0
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 9  # rank 1 died before step index 9's forward
    assert ended - last["time"] < 60, f"rank 0 outlived the killed rank by {ended - last['time']:.0f} s"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000008"

    launch(assets, "killed", **common)  # resume: auto
    expected, resumed = losses_by_step(full_run), losses_by_step(run_dir)
    assert sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(9, 13)] == [expected[s] for s in range(9, 13)]  # exact, fp32


def test_zero3_beitv2_trains_checkpoints_and_exports(assets):
    demo = assets[2]
    knn = {"knn.every": 3, "knn.train": demo.imagefolder_train, "knn.val": demo.imagefolder_val, "knn.num_workers": 0}
    launch(assets, "v2z3", objective="beitv2", **{"method.early_layer": 1, "engine.zero_stage": 3, "run.steps": 3,
                                                  "run.save_every": 3, "run.export": True, **knn})
    run_dir = assets[0] / "runs" / "v2z3"
    rec = [r for r in read_metrics(run_dir) if "loss" in r]
    assert len(rec) == 3 and {"loss_mim", "loss_cls_head", "mlm_acc", "mlm_acc_cls_head"} <= set(rec[-1])
    assert (run_dir / "checkpoints" / "step_00000003" / "complete.json").is_file()
    meta = json.loads((run_dir / "export" / "mimkit.json").read_text())
    assert meta["method"] == "beitv2" and meta["step"] == 3
    # k-NN monitoring under ZeRO-3 (parameters gathered for it) at the start and the end; the last
    # evaluation is the exported encoder's, evaluated here in one process
    evaluations = {r["step"]: r["knn_top1"] for r in read_metrics(run_dir) if "knn_top1" in r}
    assert sorted(evaluations) == [0, 3]
    from mimkit.checkpoint.load import load_vit_export
    from mimkit.knn import KnnConfig, KnnEvaluator

    encoder, norm = load_vit_export(run_dir / "export")
    cfg = KnnConfig(train=str(demo.imagefolder_train), val=str(demo.imagefolder_val), num_workers=0)
    assert KnnEvaluator(cfg, 32, norm["mean"], norm["std"])(encoder)["knn_top1"] == evaluations[3]


def test_a_pipe_failing_half_way_is_skipped_and_counted_on_both_ranks(assets):
    """Every shard comes through `pipe:` from a command that sends half the tar, prints to stderr and exits
    3 (a connection reset mid-download): both ranks count each failure (the command's stderr names the
    rank), train on the halves, and end normally; the closing record's totals over all ranks equal the
    sum of the windows, reason by reason."""
    root, _, demo = assets
    cut = root / "cut.sh"
    cut.write_text('head -c $(( $(stat -c %s "$1") / 2 )) "$1"\necho "connection reset on rank $RANK" >&2\nexit 3\n')
    shards = sorted(p.name for p in demo.shards_dir.glob("*.tar"))
    spec = f"pipe:sh {cut} {demo.shards_dir}/{{{','.join(shards)}}}"
    proc = launch(assets, "pipe", **{"run.steps": 5, "data.shards": spec, "run.picture_every": 0})
    assert "connection reset on rank 0" in proc.stdout and "connection reset on rank 1" in proc.stdout
    records = read_metrics(assets[0] / "runs" / "pipe")
    windows, end = [r for r in records if "loss" in r], records[-1]
    assert end["event"] == "end" and end["batches_per_rank"] == [5, 5] and len(windows) == 5
    assert sum(r["skipped/pipe_failed"] for r in windows) >= 4
    assert end["skipped_samples_total"] == sum(r["skipped_samples"] for r in windows) > 0
    for reason, total in end["skipped_total_by_reason"].items():
        assert total == sum(r["skipped/" + reason.replace(" ", "_")] for r in windows)
