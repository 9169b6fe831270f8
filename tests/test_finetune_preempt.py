"""Fine-tuning survives Slurm's warning signal: SIGUSR1 on one of 2 processes mid-epoch stops both after the
same step with a mid-epoch checkpoint, a requeue marker and exit code 75; the resumed run skips the batches
already trained and ends with exactly the weights and accuracy of an uninterrupted run (fp32, drop path on,
so the RNG states must come back too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from PIL import Image
from mimkit.distributed.preempt import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_exit_entry.py"
import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py

STEPS_PER_EPOCH = 6  # 48 images / global batch 8
SIGNAL_AT = 8  # epoch 1, after its 2nd batch


def _image_folder(root: Path) -> Path:
    """4 classes of 12 train / 2 val images, 32 px: a colour per class plus noise (learnable, and quick to write)."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 2)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                base = torch.tensor([(c & 1) * 200.0, (c >> 1) * 200.0, 100.0]).view(3, 1, 1)
                pixels = (base + 60 * torch.rand(3, 32, 32, generator=g)).clamp(0, 255).byte()
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(root / split / f"c{c}" / f"{i}.png")
    return root


def _weights(run: Path) -> dict:
    ckpt = run / "checkpoints"
    return load_file(str(ckpt / (ckpt / "latest").read_text() / "model.safetensors"))


def _losses(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.timeout(240)
def test_usr1_on_one_process_stops_both_saves_mid_epoch_and_resume_equals_uninterrupted(tmp_path):
    runs = tmp_path / "runs"
    args = ["--config", str(TINY), f"run.root={runs}", f"data.root={_image_folder(tmp_path / 'data')}",
            "optim.epochs=2", "optim.warmup_epochs=0.5", "aug.enabled=false", "model.drop_path=0.1",
            "data.batch_size=8", "data.eval_batch_size=4", "run.save_every=1", "run.log_every=1"]

    def launch(*runs_args):  # several runs on the same 2 processes, joined by --then (start-up is the cost)
        exits = tmp_path / f"exit_{len(list(tmp_path.glob('exit_*')))}"
        exits.mkdir()
        argv = [a for i, extra in enumerate(runs_args) for a in ([] if i == 0 else ["--then"]) + [*args, *extra]]
        proc = _helper.run_torchrun(ENTRY, argv, cwd=tmp_path, check=False, timeout=180, MIMKIT_EXIT_DIR=str(exits))
        codes = {int(p.name.split("_")[1]): int(p.read_text()) for p in exits.glob("exit_*")}
        return proc, codes

    # the uninterrupted run, then the same run with SIGUSR1 sent to process 1 after step 8 (mid-epoch)
    cut = runs / "cut"
    stopped, codes = launch(["run.name=straight"],
                            ["run.name=cut", f"debug.signal_at_step={SIGNAL_AT}", "debug.signal_rank=1"])
    out = stopped.stdout
    assert (runs / "straight" / "results.json").is_file(), out[-4000:]
    assert codes == {0: REQUEUE_EXIT_CODE, 1: REQUEUE_EXIT_CODE}, out[-4000:]  # not killed by SIGUSR1
    assert stopped.returncode != 0 and re.search(rf"exitcode\s*:\s*{REQUEUE_EXIT_CODE}", out), out[-4000:]
    # both processes stopped after the same step; only process 1 was signalled
    stops = sorted(re.findall(r"process (\d): stopped at step (\d+) \(epoch (\d), batch (\d) of 6; (\S+)", out))
    assert stops == [("0", str(SIGNAL_AT), "1", "2", "another"), ("1", str(SIGNAL_AT), "1", "2", "SIGUSR1")], out[-4000:]
    tag = (cut / "checkpoints" / "latest").read_text()
    assert tag == f"epoch_0001_step_{SIGNAL_AT:08d}"
    state = json.loads((cut / "checkpoints" / tag / "state.json").read_text())
    assert (state["epoch"], state["step"], state["epoch_step"]) == (1, SIGNAL_AT, SIGNAL_AT - STEPS_PER_EPOCH)
    assert {p.name for p in (cut / "checkpoints" / tag).glob("rng_*.pt")} == {"rng_0.pt", "rng_1.pt"}
    marker = json.loads((cut / "requeue").read_text())
    assert marker["checkpoint"] == tag and marker["step"] == SIGNAL_AT
    assert max(_losses(cut)) == SIGNAL_AT and not (cut / "results.json").exists()

    resumed, codes = launch(["run.name=cut"])  # what the requeued job runs: the same command, run.resume=auto
    assert resumed.returncode == 0 and codes == {0: 0, 1: 0}, resumed.stdout[-4000:]
    assert f"resumed from {cut / 'checkpoints' / tag}" in resumed.stdout
    assert not (cut / "requeue").exists()
    assert (cut / "checkpoints" / "latest").read_text() == "epoch_0001"
    assert not list((cut / "checkpoints").glob("epoch_*_step_*")), "the mid-epoch save is superseded"

    a, b = _losses(runs / "straight"), _losses(cut)
    assert sorted(b) == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # no step trained twice, none skipped
    assert b == a  # exact, fp32
    wa, wb = _weights(runs / "straight"), _weights(cut)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = json.loads((runs / "straight" / "results.json").read_text())
    rb = json.loads((cut / "results.json").read_text())
    assert (rb["top1"], rb["loss"], rb["steps"]) == (ra["top1"], ra["loss"], ra["steps"])
