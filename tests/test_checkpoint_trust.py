"""Resume trusts no checkpoint file: every file is checked against the size and SHA-256 its completion
record holds (a damaged `latest` is named and the run falls back to the newest checkpoint that
verifies, or stops under run.resume=strict), and no file may run code when it is unpickled (pretraining
and tokenizer training share the store; fine-tuning's own files are read with weights_only=True)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from mimkit.checkpoint.safe_load import UnsafeCheckpointFile, file_digest
from mimkit.checkpoint.store import COMPLETE, DamagedCheckpoint, choose_checkpoint, publish_latest
from mimkit.finetune.trainer import STATE, ResumeError, load_optimizer_state

from mimkit.checkpoint.tokenizer_export import save_random_tokenizer_export
from mimkit.data.demo import make_demo_data
from mimkit.errors import USER_ERROR_EXIT_CODE
from mimkit.runlog import read_metrics

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit_test_distributed import inject_payload

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "pretrain" / "beit_tiny_cpu.yaml"
SEQUENCE = _helper.SCRIPTS / "pretrain_sequence.py"


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ---- the shared store's decision, in one process --------------------------------------------------


def _fake_checkpoints(root: Path, steps=(4, 8)) -> Path:
    """Checkpoints as the store lays them out: a pickle and a raw file each, published with their record."""
    for step in steps:
        tag = root / f"step_{step:08d}"
        tag.mkdir(parents=True)
        torch.save({"module": {"w": torch.full((64,), float(step))}}, tag / "mp_rank_00_model_states.pt")
        (tag / "notes.bin").write_bytes(bytes(range(200)))
        publish_latest(root, tag.name, {"step": step}, written=[tag / "mp_rank_00_model_states.pt"])
    return root


def test_record_holds_every_file_and_a_damaged_latest_falls_back_or_stops(tmp_path, capsys):
    root = _fake_checkpoints(tmp_path / "ckpt")
    record = json.loads((root / "step_00000008" / COMPLETE).read_text())
    assert record["step"] == 8 and sorted(record["files"]) == ["mp_rank_00_model_states.pt", "notes.bin"]
    assert record["files"]["notes.bin"] == file_digest(root / "step_00000008" / "notes.bin")
    assert choose_checkpoint("auto", root) == root / "step_00000008"

    bad = root / "step_00000008" / "mp_rank_00_model_states.pt"
    size = bad.stat().st_size
    flip_byte(bad)  # same size, one bit changed
    assert choose_checkpoint("auto", root) == root / "step_00000004"
    err = capsys.readouterr().err
    assert re.search(rf"refusing step_00000008: {re.escape(str(bad))}: sha256 \w+\.\.\., recorded \w+\.\.\.", err)
    assert "resuming from" in err and "step_00000004" in err
    with pytest.raises(DamagedCheckpoint, match=rf"run.resume=strict: {re.escape(str(bad))}: sha256"):
        choose_checkpoint("strict", root)
    with pytest.raises(DamagedCheckpoint, match="sha256"):  # a path named by hand is not replaced either
        choose_checkpoint(str(root / "step_00000008"), root)

    truncate(bad)
    with pytest.raises(DamagedCheckpoint, match=rf"{re.escape(str(bad))}: size {size // 2}, recorded {size}"):
        choose_checkpoint("strict", root)
    flip_byte(root / "step_00000004" / "notes.bin")  # nothing verifies: stop, naming the refused ones
    with pytest.raises(DamagedCheckpoint, match="no checkpoint .* verifies .*step_00000008, step_00000004"):
        choose_checkpoint("auto", root)


def test_hashes_checked_while_loading_refuse_a_flipped_tensor_and_load_the_previous_one(tmp_path, capsys):
    """With a loader, only sizes and the code scan run before it; the hashes are checked while it reads,
    and a checkpoint that fails them is replaced by loading the next one over it."""
    root = _fake_checkpoints(tmp_path / "ckpt")
    bad = root / "step_00000008" / "mp_rank_00_model_states.pt"
    flip_byte(bad, offset=bad.stat().st_size // 2)  # inside the tensor's bytes: the pickle still reads
    loaded = []
    assert choose_checkpoint("auto", root, load=loaded.append) == root / "step_00000004"
    assert loaded == [root / "step_00000008", root / "step_00000004"]  # latest was read once, then replaced
    assert re.search(rf"refusing step_00000008: {re.escape(str(bad))}: sha256", capsys.readouterr().err)
    with pytest.raises(DamagedCheckpoint, match=rf"run.resume=strict: {re.escape(str(bad))}: sha256"):
        choose_checkpoint("strict", root, load=loaded.append)
    truncate(bad)  # a size that is wrong is caught before anything is loaded
    loaded.clear()
    assert choose_checkpoint("auto", root, load=loaded.append) == root / "step_00000004"
    assert loaded == [root / "step_00000004"]


def test_checkpoint_without_hashes_loads_with_one_warning_and_is_still_scanned(tmp_path, capsys):
    root = _fake_checkpoints(tmp_path / "ckpt", steps=(4,))
    record_path = root / "step_00000004" / COMPLETE
    record_path.write_text(json.dumps({"step": 4, "world_size": 2}))  # as saved before this change
    assert choose_checkpoint("auto", root) == root / "step_00000004"
    assert capsys.readouterr().err.count("records no file hashes") == 1
    marker = tmp_path / "pwned"
    inject_payload(root / "step_00000004" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpointFile, match="mp_rank_00_model_states.pt: refused to unpickle"):
        choose_checkpoint("auto", root)
    assert not marker.exists()


def test_payload_with_a_matching_record_stops_even_auto(tmp_path):
    root = _fake_checkpoints(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    inject_payload(root / "step_00000008" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpointFile, match="refused to unpickle"):
        choose_checkpoint("auto", root)  # tampering is not damage: no quiet fallback
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_1.pt"])
def test_finetune_files_carrying_code_are_refused(tmp_path, name):
    tag = tmp_path / "checkpoints" / "epoch_0001"
    tag.mkdir(parents=True)
    (tag / STATE).write_text(json.dumps({"epoch": 1, "step": 12, "best_top1": 0.0, "num_processes": 2}))
    for file in ("optimizer.pt", "rng_0.pt", "rng_1.pt"):
        torch.save({"state": {}, "t": torch.zeros(2)}, tag / file)
    publish_latest(tag.parent, tag.name, {"step": 12}, written=sorted(tag.iterdir()))
    marker = tmp_path / "pwned"
    inject_payload(tag / name, marker)
    with pytest.raises(ResumeError, match=rf"{name}: refused to unpickle"):
        load_optimizer_state(tag / name)  # fine-tuning's own reader: weights_only=True
    with pytest.raises(UnsafeCheckpointFile, match=rf"{name}: refused to unpickle"):
        choose_checkpoint("auto", tag.parent, required=STATE)  # and its resume scan, on every process
    assert not marker.exists()


# ---- 2 ranks, DeepSpeed ZeRO-2, the pretraining stage ---------------------------------------------

STEPS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trust")


def pretrain_args(root: Path, name: str, resume: str = "auto") -> list[str]:
    """BEiT tiny on the demo shards, 8 steps of 8 images a rank, a checkpoint every 4."""
    tok = root / "tok"
    if not tok.is_dir():
        save_random_tokenizer_export(tok, "dvae", input_size=32, seed=3)
        (root / "shards").write_text(str(make_demo_data(root / "demo", image_size=32, images_per_shard=50).shards_dir))
    settings = {"data.shards": (root / "shards").read_text(), "method.tokenizer": tok, "run.root": root / "runs",
                "run.name": name, "run.log_every": 1, "data.num_workers": 0, "data.batches_per_epoch": 5,
                "data.batch_size": 8, "optim.warmup_steps": 2, "run.export": False, "run.steps": STEPS,
                "run.save_every": 4, "run.resume": resume}
    return ["--config", str(PRESET), *(f"{k}={v}" for k, v in settings.items())]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def base_run(root):
    """8 steps, checkpoints at 4 and 8."""
    _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py", pretrain_args(root, "base"), cwd=root, timeout=240)
    return root / "runs" / "base"


@pytest.fixture(scope="module")
def resumed(root, base_run, tmp_path_factory):
    """Copies of the base run, each damaged one way, resumed one after the other in one launch."""
    runs = root / "runs"
    marker_dir = tmp_path_factory.mktemp("markers")
    latest = "step_00000008"
    damage = {
        # in the middle of the moments' bytes: the file still unpickles, only its hash (read beside the load) tells
        "flipped": lambda t: [flip_byte(f, f.stat().st_size // 2) for f in t.glob("zero_pp_rank_1_*optim_states.pt")],
        "direct": lambda t: None,
        "strict": lambda t: truncate(t / "mp_rank_00_model_states.pt"),
        "legacy": lambda t: [p.write_text(json.dumps({"step": 8, "world_size": 2}))
                             for p in t.parent.glob(f"step_*/{COMPLETE}")],
    }
    files = {"model": "mp_rank_00_model_states.pt", "optim0": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "optim1": "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    for kind, name in files.items():
        damage[f"payload_{kind}"] = lambda t, name=name, kind=kind: inject_payload(t / name, marker_dir / kind)
    resume = {"strict": "strict", "direct": str(runs / "direct" / "checkpoints" / "step_00000004")}
    groups = []
    for name, hurt in damage.items():
        shutil.copytree(base_run, runs / name)
        (runs / name / "metrics.jsonl").write_text("")  # only this run's losses
        hurt(runs / name / "checkpoints" / latest)
        groups.append(pretrain_args(root, name, resume.get(name, "auto")))
    exits = tmp_path_factory.mktemp("exits")
    (exits / "runs.json").write_text(json.dumps(groups))
    proc = _helper.run_torchrun(SEQUENCE, [exits / "runs.json"], cwd=root, timeout=400, MIMKIT_EXIT_DIR=str(exits),
                                MIMKIT_PEER_GRACE_S="0")  # one process runs them all: no launcher ends rank 1
    codes = [dict(zip(damage, map(int, (exits / f"codes_{r}").read_text().split()))) for r in (0, 1)]
    return runs, proc.stdout, codes, marker_dir


def test_flipped_bit_in_latest_is_named_and_the_fallback_repeats_a_direct_resume(resumed, base_run):
    runs, out, codes, _ = resumed
    assert codes[0]["flipped"] == codes[1]["flipped"] == 0, out[-4000:]
    assert re.search(r"refusing step_00000008: \S+/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 \w+\.\.\., "
                     r"recorded \w+\.\.\.", out), out[-4000:]
    assert re.search(r"resuming from \S+/flipped/checkpoints/step_00000004, the newest checkpoint that verifies", out)
    fallback, direct = losses_by_step(runs / "flipped"), losses_by_step(runs / "direct")
    assert sorted(fallback) == list(range(5, STEPS + 1)) and fallback == direct
    base = losses_by_step(base_run)
    assert fallback == {s: base[s] for s in range(5, STEPS + 1)}  # exact, fp32


def test_strict_stops_on_a_truncated_latest_with_one_line(resumed):
    runs, out, codes, _ = resumed
    assert codes[0]["strict"] == codes[1]["strict"] == USER_ERROR_EXIT_CODE
    line = re.search(r"pretrain: run.resume=strict: \S+/strict/checkpoints/step_00000008/mp_rank_00_model_states.pt: "
                     r"size (\d+), recorded (\d+)", out)
    assert line and int(line.group(1)) < int(line.group(2)), out[-4000:]
    assert not losses_by_step(runs / "strict")


def test_checkpoint_without_hashes_resumes_with_a_warning(resumed):
    _, out, codes, _ = resumed
    assert codes[0]["legacy"] == codes[1]["legacy"] == 0
    assert re.search(r"legacy/checkpoints/step_00000008 records no file hashes", out)


@pytest.mark.parametrize("kind", ["model", "optim0", "optim1"])
def test_payload_in_any_deepspeed_file_is_refused_on_every_rank(resumed, kind):
    runs, out, codes, marker_dir = resumed
    assert codes[0][f"payload_{kind}"] == codes[1][f"payload_{kind}"] == USER_ERROR_EXIT_CODE
    assert re.search(rf"pretrain: run.resume=auto: \S+/payload_{kind}/checkpoints/step_00000008/\S+\.pt: "
                     "refused to unpickle", out), out[-4000:]
    assert not (marker_dir / kind).exists()
    assert not losses_by_step(runs / f"payload_{kind}")
