"""The tokenizers stage for real: 2 ranks over gloo, DeepSpeed ZeRO-2, tiny models, the demo shards.

One ``torchrun`` launch trains every tokenizer in turn through the stage's CLI entry (``main(argv)``,
what ``python tokenizers`` calls), so process start-up and DeepSpeed's import are paid once:
dVAE, PeCo and VQ-KD with dead-code restarts on, and PeCo and VQ-KD with them off.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit_test_distributed import inject_payload, run_torchrun  # tests/distributed.py, registered by conftest.py
from mimkit.config import ConfigError, parse_cli
from mimkit.data.demo import make_demo_data
from mimkit.checkpoint.tokenizer_export import load_tokenizer
from mimkit.runlog import read_metrics
from mimkit.tokenizers.config import TokenizerTrainConfig
from mimkit.tokenizers.trainer import CHECK_FILE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "tokenizers"
RUNS = {  # run name -> (preset, extra overrides)
    "dvae": ("dvae_tiny_cpu.yaml", []),
    "peco": ("peco_tiny_cpu.yaml", []),
    "peco_norestart": ("peco_tiny_cpu.yaml", ["peco.codebook.restart_dead=false"]),
    "vqkd": ("vqkd_tiny_cpu.yaml", []),
    "vqkd_norestart": ("vqkd_tiny_cpu.yaml", ["vqkd.codebook.restart_dead=false"]),
}
# A preempted run (SIGUSR1 on rank 1 after step PREEMPT_AT) and its resume: same preset as "dvae".
PREEMPT_AT = 60
PREEMPTED = ("dvae_preempted", "dvae_tiny_cpu.yaml")
DRIVER = """
import json, os, sys
from pathlib import Path
from mimkit.tokenizers.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as stop:  # 75: preempted, saved, asks for a requeue: the next argv resumes it
        if stop.code != 75:
            raise
        # a file per rank: the ranks' stdout lines interleave with the progress bars in the shared pipe
        Path(sys.argv[2], "exit75_rank" + os.environ["RANK"]).touch()
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def runs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_runs")
    argvs = [["--config", str(CONFIGS / preset), f"data.shards={demo.train_shard_pattern}", f"run.root={root}",
              f"run.name={name}", "run.resume=none", *extra] for name, (preset, extra) in RUNS.items()]
    name, preset = PREEMPTED
    base = ["--config", str(CONFIGS / preset), f"data.shards={demo.train_shard_pattern}", f"run.root={root}",
            f"run.name={name}"]
    argvs += [[*base, "run.resume=none", f"debug.signal_at_step={PREEMPT_AT}", "debug.signal_rank=1"],
              [*base, "run.resume=auto"]]
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    # cwd: the presets name configs/tokenizers/open_clip_tiny.json relative to the repository root
    run_torchrun(driver, [json.dumps(argvs), str(root)], cwd=ROOT, timeout=900)
    assert sorted(p.name for p in root.glob("exit75_rank*")) == ["exit75_rank0", "exit75_rank1"]  # both ranks stopped
    return {name: root / name for name in [*RUNS, PREEMPTED[0]]}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def final_usage(run_dir: Path) -> float:
    return [r["codebook_usage"] for r in read_metrics(run_dir) if "codebook_usage" in r][-1]


def held_out_images(demo, size: int, count: int = 32) -> torch.Tensor:
    """Validation images (never in the training shards) at ``size``, in [0, 1]: [B, 3, size, size]."""
    files = sorted(Path(demo.imagefolder_val).rglob("*.jpg"))[:count]
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the PSNR (peak 1.0)."""
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1.0 / mse)).mean())


@pytest.mark.parametrize("name", ["dvae", "peco", "vqkd"])
def test_loss_falls(runs, name):
    values = losses(runs[name])
    assert len(values) >= 6
    first, last = np.mean(values[:2]), np.mean(values[-3:])
    print(f"{name}: loss {first:.4f} -> {last:.4f}")
    assert last < first * 0.9, values


@pytest.mark.parametrize("name", ["dvae", "peco"])
def test_reconstruction_beats_constant_colour(runs, demo, name):
    tok = load_tokenizer(runs[name] / "export")  # the export carries the decoder (preset: include_decoder)
    x = held_out_images(demo, tok.input_size[0])
    recon = tok.model.decode_ids(tok.tokenize(tok.normalize(x)))
    mean = torch.tensor(tok.mean).view(1, 3, 1, 1)
    std = torch.tensor(tok.std).view(1, 3, 1, 1)
    recon = (recon * std + mean).clamp(0, 1)
    ours = psnr(recon, x)
    constant = psnr(x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x), x)  # best single colour for the batch
    per_image = psnr(x.mean(dim=(2, 3), keepdim=True).expand_as(x), x)  # each image's own mean colour
    print(f"{name}: PSNR {ours:.2f} dB, constant colour {constant:.2f} dB, per-image colour {per_image:.2f} dB")
    assert ours > constant + 0.5


@pytest.mark.parametrize("name", ["peco", "vqkd"])
def test_dead_code_restarts_keep_the_codebook_used(runs, name):
    on, off = final_usage(runs[name]), final_usage(runs[f"{name}_norestart"])
    print(f"{name}: codebook usage {on:.1%} with restarts, {off:.1%} without")
    assert on > 0.5
    assert on > off + 0.1


@pytest.mark.parametrize("name", ["dvae", "peco", "vqkd"])
def test_export_gives_the_trainer_ids(runs, name):
    tok = load_tokenizer(runs[name] / "export")
    check = torch.load(runs[name] / CHECK_FILE, weights_only=True)
    assert torch.equal(tok.tokenize(check["images"]), check["ids"])
    info = json.loads((runs[name] / "export" / "mimkit.json").read_text())
    assert info["kind"] == name and tuple(info["grid"]) == tuple(check["ids"].shape[1:])
    assert {"input_size", "interpolation", "mean", "std", "vocab_size", "data_shards_hash"} <= set(info)
    from safetensors.torch import load_file

    keys = load_file(str(runs[name] / "export" / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "tokenizer.", "teacher", "discriminator")) for k in keys)
    if name == "vqkd":  # BEiT targets: no decoder unless asked, never the teacher
        assert not any(k.startswith(("decoder.", "decode_task_layer.")) for k in keys)
        assert info["teacher"]["library"] == "open_clip"


def test_pictures_and_usage_histogram_written(runs):
    for name in ("dvae", "peco"):
        assert list((runs[name] / "pictures").glob("recon_*.png"))
    for name in RUNS:
        assert list((runs[name] / "pictures").glob("codebook_usage_*.png"))


def test_cli_rejects_an_unknown_key():
    with pytest.raises(ConfigError, match="peco.codebok"):
        parse_cli(TokenizerTrainConfig, ["--config", str(CONFIGS / "peco_tiny_cpu.yaml"), "peco.codebok.beta=1"])


def test_preempted_run_saves_requeues_and_resumes_to_the_same_losses(runs):
    rows = read_metrics(runs[PREEMPTED[0]])
    stops = [r["step"] for r in rows if r.get("event") == "preempted"]
    assert stops == [PREEMPT_AT]  # both ranks agreed on the step; rank 0 logged it once
    checkpoints = sorted(p.name for p in (runs[PREEMPTED[0]] / "checkpoints").iterdir() if p.is_dir())
    assert any(str(PREEMPT_AT) in name for name in checkpoints), checkpoints
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    reference = {r["step"]: r["loss"] for r in read_metrics(runs["dvae"]) if "loss" in r}
    assert sorted(logged) == sorted(reference)  # no step lost or repeated
    after = [s for s in reference if s > PREEMPT_AT]
    assert after and all(logged[s] == pytest.approx(reference[s], rel=1e-5) for s in after)
    assert (runs[PREEMPTED[0]] / "export" / "mimkit.json").exists()


def test_resume_refuses_a_checkpoint_whose_files_carry_code(runs, demo, tmp_path):
    """Every file of the preempted dVAE run's checkpoint (model states, both ranks' optimizer partitions)
    carries a payload with a matching record: the 2-rank resume stops with one line naming a file and
    no payload runs."""
    run = tmp_path / "dvae"
    shutil.copytree(runs[PREEMPTED[0]], run)
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    pickles = sorted(tag.glob("*.pt"))
    assert len(pickles) == 3
    for path in pickles:
        inject_payload(path, tmp_path / f"ran_{path.stem}")
    argv = ["--config", str(CONFIGS / RUNS["dvae"][0]), f"data.shards={demo.train_shard_pattern}",
            f"run.root={tmp_path}", "run.name=dvae", "run.resume=auto", "run.steps=220"]
    driver = tmp_path / "resume.py"
    driver.write_text("import sys\nfrom mimkit.tokenizers.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = run_torchrun(driver, argv, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode != 0
    assert re.search(rf"run.resume=auto: {re.escape(str(tag))}/\S+\.pt: refused to unpickle", proc.stdout), proc.stdout[-3000:]
    assert not list(tmp_path.glob("ran_*"))
