"""Resuming on another number of ranks or ZeRO stage (2-rank gloo, real DeepSpeed): a 2-rank ZeRO-2 MAE
run preempted at step 4 resumes on 1 rank, that run's checkpoint on 2 ranks, and the first on 2 ranks at
ZeRO-3. The checkpoint goes through DeepSpeed's universal form (converted once, verified, reused): its fp32
weights and both Adam moments equal the saved partitions element for element, the engines load exactly
them, and the loss curve, the step, the lr and the samples seen continue."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimkit.checkpoint.export import export_run, merge_zero12
from mimkit.checkpoint.safe_load import load_tensors_only
from mimkit.data.demo import make_demo_data
from mimkit.runlog import read_metrics

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "pretrain" / "mae_tiny_cpu.yaml"
PROBE = _helper.SCRIPTS / "reshape_probe.py"
BATCH = 8  # per rank
LR, BASE = 1.2e-2, 256  # the preset's lr rule: lr x global batch / 256


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshape")
    make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    return root


def args(root, name, **extra):
    base = {"data.shards": str(root / "demo" / "shards"), "run.root": str(root / "runs"), "run.name": name,
            "run.log_every": 1, "data.num_workers": 0, "data.batches_per_epoch": 5, "data.batch_size": BATCH,
            "run.export": False, "run.save_every": 100, "optim.warmup_steps": 2}
    base.update(extra)
    return ["--config", PRESET, *[f"{k}={v}" for k, v in base.items()]]


def launch(root, name, nproc, check=True, **extra):
    return _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py", args(root, name, **extra), nproc=nproc,
                                cwd=root, timeout=300, check=check)


def copy_run(root, src, dst):
    shutil.copytree(root / "runs" / src, root / "runs" / dst)
    return root / "runs" / dst


def by_step(run_dir, key):
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


@pytest.fixture(scope="module")
def preempted(root):
    """2 ranks, ZeRO-2, 8 steps asked, preempted (SIGUSR1) after step 4: saved there, exit 75."""
    proc = launch(root, "base", 2, check=False, **{"run.steps": 8, "debug.signal_at_step": 4})
    assert proc.returncode != 0, proc.stdout[-3000:]  # torchrun turns the requeue code 75 into a failure
    run = root / "runs" / "base"
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    return run


def zero12_reference(tag_dir):
    """fp32 weights and Adam moments by name, merged from the saved ZeRO-1/2 partitions (export's merge)."""
    model = load_tensors_only(tag_dir / "mp_rank_00_model_states.pt")
    optim = [load_tensors_only(p)["optimizer_state_dict"] for p in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))]
    out = {}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        parts = [{"single_partition_of_fp32_groups": o["single_partition_of_fp32_groups"] if key == "fp32" else
                  [o["base_optimizer_state"]["state"][g][key] for g in range(len(o["single_partition_of_fp32_groups"]))],
                  "param_alignment_paddings": o.get("param_alignment_paddings")} for o in optim]
        out.update({f"{name}/{key}": t for name, t in merge_zero12(parts, model["param_shapes"]).items()})
    return out


def assert_equal(found, expected):
    assert sorted(found) == sorted(expected)
    for k in expected:
        assert torch.equal(found[k], expected[k]), k


def test_two_ranks_resume_on_one_then_one_on_two(root, preempted):
    saved = zero12_reference(preempted / "checkpoints" / "step_00000004")
    run = copy_run(root, "base", "to1")
    launch(root, "to1", 1, **{"run.steps": 8})
    uni = run / "checkpoints" / "universal" / "step_00000004"
    record = json.loads((uni / "complete.json").read_text())
    assert record["source"] == "step_00000004" and record["world_size"] == 2 and "zero/encoder.pos_embed/fp32.pt" in record["files"]
    # the conversion is lossless: every trained tensor and both Adam moments, element for element
    converted = {f"{p.parent.name}/{p.stem}": load_tensors_only(p)["param"]
                 for p in uni.glob("zero/*/*.pt") if p.stem in ("fp32", "exp_avg", "exp_avg_sq")}
    assert set(converted) - set(saved) == {"encoder.pos_embed/fp32"}  # frozen (sin-cos): the converter adds it
    assert_equal({k: converted[k] for k in saved}, saved)
    # ...and a 1-rank engine loads exactly them (read back whole from the engine after the load)
    _helper.run_torchrun(PROBE, [root / "probe1.safetensors", *args(root, "base", **{"run.resume": preempted / "checkpoints" / "step_00000004"})],
                         nproc=1, cwd=root)
    assert_equal(load_file(root / "probe1.safetensors"), saved)

    loss, lr, samples = by_step(preempted, "loss"), by_step(run, "lr"), by_step(run, "samples")
    resumed = by_step(run, "loss")
    assert sorted(resumed) == list(range(1, 9))  # steps 1-4 from the first job, 5-8 from this one
    # the curve continues: step 5 (new world size, new batches) within a third of the drop so far of step 4's
    # loss; a fresh start would be back near step 1's
    assert abs(resumed[5] - loss[4]) < (loss[1] - loss[4]) / 3, (loss, resumed)
    assert resumed[8] < loss[4]
    # lr: the preset's cosine schedule at each step, at the lr its batch rule gives the new global batch
    from mimkit.optim import cosine_schedule
    assert lr[5] == pytest.approx(cosine_schedule(4, LR * BATCH / BASE, 2, 8, 0.0))
    assert samples[4] == 4 * 2 * BATCH and samples[8] == 4 * 2 * BATCH + 4 * BATCH  # 64 at 2 ranks, then 8 a step
    client = load_tensors_only(run / "checkpoints" / "step_00000008" / "mp_rank_00_model_states.pt")
    assert client["step"] == 8 and client["samples"] == samples[8] and client["world_size"] == 1

    # 1 -> 2: the checkpoint this 1-rank run saved at step 8 continues on 2 ranks
    run2 = copy_run(root, "to1", "to2")
    launch(root, "to2", 2, **{"run.steps": 10})
    again = by_step(run2, "loss")
    assert abs(again[9] - resumed[8]) < (loss[1] - loss[4]) / 3
    assert by_step(run2, "samples")[10] == samples[8] + 2 * 2 * BATCH
    end = read_metrics(run2)[-1]
    assert end["event"] == "end" and end["batches_per_rank"] == [2, 2]

    # the universal form exports like any checkpoint, the same weights as the one it came from
    export_run(run, step=4, out_dir=root / "exp_saved")
    export_run(run, universal=True, out_dir=root / "exp_uni")
    assert_equal(load_file(root / "exp_uni" / "model.safetensors"), load_file(root / "exp_saved" / "model.safetensors"))


def test_zero2_checkpoint_resumes_at_zero3(root, preempted):
    saved = zero12_reference(preempted / "checkpoints" / "step_00000004")
    run = copy_run(root, "base", "z3")
    proc = _helper.run_torchrun(PROBE, [root / "probe3.safetensors", *args(root, "z3", **{"engine.zero_stage": 3})],
                                nproc=2, cwd=root)
    assert_equal(load_file(root / "probe3.safetensors"), saved)
    # each group keeps its own settings (DeepSpeed's stage-3 universal loader copies the first group's)
    assert "step 4 samples 64 ranks 2 wd_scale [1.0, 0.0]" in proc.stdout
    launch(root, "z3", 2, **{"run.steps": 6, "engine.zero_stage": 3})  # reuses the universal form the probe made
    loss, resumed = by_step(preempted, "loss"), by_step(run, "loss")
    assert abs(resumed[5] - loss[4]) < (loss[1] - loss[4]) / 3
    assert by_step(run, "samples")[6] == 6 * 2 * BATCH
    assert json.loads((run / "environment.json").read_text())["zero_stage"] == 3


TOKENIZER_DRIVER = """
import sys
from mimkit.tokenizers.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_tokenizer_resumes_on_one_rank_with_its_codebook_statistics(root):
    """PeCo (EMA codebook) on 2 ranks, preempted after step 4, resumed on 1 rank: the codebook (a buffer
    the EMA writes, which DeepSpeed's universal load skips) and the weights come back exactly, the step and
    samples seen continue."""
    driver = root / "tok_driver.py"
    driver.write_text(TOKENIZER_DRIVER)
    base = ["--config", ROOT / "configs" / "tokenizers" / "peco_tiny_cpu.yaml", f"data.shards={root / 'demo' / 'shards'}",
            f"run.root={root / 'runs'}", "run.name=tok", "data.batch_size=4", "run.log_every=1", "run.usage_every=100",
            "run.picture_every=0"]
    proc = _helper.run_torchrun(driver, [*base, "run.steps=6", "debug.signal_at_step=4"], nproc=2, cwd=ROOT, check=False)
    run = root / "runs" / "tok"
    assert proc.returncode != 0 and (run / "checkpoints" / "latest").read_text() == "step_00000004", proc.stdout[-3000:]
    saved = load_tensors_only(run / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")["module"]
    _helper.run_torchrun(driver, [*base, "run.steps=4"], nproc=1, cwd=ROOT)  # resume, no step: export what it loaded
    exported = load_file(run / "export" / "model.safetensors")
    # the codebook is a buffer the EMA writes (as are its EMA sums and counts, put back by the same code)
    assert "quantizer.embedding" in exported and "tokenizer.quantizer.ema_count" in saved
    for k in exported:
        assert torch.equal(exported[k], saved[f"tokenizer.{k}"].to(exported[k].dtype)), k
    meta = json.loads((run / "export" / "mimkit.json").read_text())
    assert meta["step"] == 4 and meta["samples_seen"] == 4 * 2 * 4


FT_ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_exit_entry.py"


def test_finetune_preempted_on_two_processes_resumes_on_one(root):
    """accelerate keeps weights and optimizer state whole, and batches are global (split across processes):
    a run preempted on 2 processes resumes on 1 with nothing converted, and, with no randomness per process
    (no augmentation, no drop path), repeats the uninterrupted 2-process run's losses to float rounding."""
    common = ["--config", ROOT / "configs" / "finetune" / "tiny_cpu.yaml", f"run.root={root / 'ft'}",
              f"data.root={root / 'demo' / 'imagefolder'}", "data.label_fraction=0.25",
              "optim.epochs=2", "optim.warmup_epochs=0.5", "aug.enabled=false", "model.drop_path=0.0",
              "data.batch_size=8", "data.eval_batch_size=4", "run.save_every=1", "run.log_every=1"]
    exits = root / "ft_exits"
    exits.mkdir()
    _helper.run_torchrun(FT_ENTRY, [*common, "run.name=straight", "--then", *common, "run.name=cut",
                                    "debug.signal_at_step=8", "debug.signal_rank=1"],
                         nproc=2, cwd=root, check=False, MIMKIT_EXIT_DIR=str(exits))
    cut = root / "ft" / "cut"
    assert (cut / "checkpoints" / "latest").read_text() == "epoch_0001_step_00000008"
    _helper.run_torchrun(FT_ENTRY, [*common, "run.name=cut"], nproc=1, cwd=root, MIMKIT_EXIT_DIR=str(exits))

    def losses(run):
        return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}

    straight, resumed = losses(root / "ft" / "straight"), losses(cut)
    assert sorted(resumed) == sorted(straight) == list(range(1, 13))  # 2 epochs of 48 images / 8, none lost
    for step in range(9, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-6), (step, resumed, straight)
