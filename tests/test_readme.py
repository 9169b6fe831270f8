"""The README's commands run as written: the block marked `<!-- readme-smoke -->` is executed line by line
with the real launchers (`deepspeed`, `accelerate launch`, `mimkit`), each command as the README has it
plus tiny overrides (a 64-wide ViT, 32 px, 2 steps), on the demo images. The docs cite nothing outside the
repository."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mimkit.data.demo import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_VIT = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2", "model.num_heads=4"]
TINY_STREAM = ["data.image_size=32", "data.batch_size=4", "data.num_workers=0", "data.batches_per_epoch=2",
               "engine.precision=fp32", "run.steps=2", "optim.warmup_steps=0"]
# config -> what makes its command a smoke run (the README's keys come first, so these win)
SMOKE = {
    "configs/tokenizers/dvae_vit_b16.yaml": [*TINY_STREAM, "dvae.vocab_size=64", "dvae.n_hid=16",
                                             "dvae.blocks_per_group=1", "dvae.n_init=32"],
    "configs/pretrain/beit_vit_b16.yaml": [*TINY_VIT, *TINY_STREAM, "method.num_masked=6", "method.min_block=2"],
    "configs/pretrain/milan_vit_b16.yaml": [*TINY_VIT, *TINY_STREAM, "method.decoder_dim=64", "method.decoder_depth=1",
                                            "method.decoder_heads=4", "method.teacher.pretrained=null",
                                            "method.teacher.model_name=tiny-random", "method.teacher.precision=fp32",
                                            "method.teacher.model_cfg=configs/tokenizers/open_clip_tiny.json"],
    "configs/finetune/imagenet_beit_vit_b16.yaml": ["cpu=true", "model.img_size=32", "data.num_classes=4",
                                                    "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
                                                    "optim.epochs=1", "optim.max_steps=2"],
}
LAUNCHER_OPTIONS = {"accelerate": ["--cpu", "--num_processes", "1"]}  # after `launch`: this machine's one process


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-smoke -->\n```\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- readme-smoke --> block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def smoke_form(line: str, work: Path, images: Path) -> list[str]:
    """The README line with its paths moved under `work` / the demo images, and its tiny overrides."""
    words = []
    for word in shlex.split(line):
        key, eq, value = word.partition("=")
        path = value if eq else key
        if path.startswith("/data/imagenet"):
            path = str(images) + path[len("/data/imagenet"):]
        elif path.startswith(("shards/", "runs/")):
            path = str(work / path)
        words.append(f"{key}={path}" if eq else path)
    if words[0] in LAUNCHER_OPTIONS:
        words[2:2] = LAUNCHER_OPTIONS[words[0]]
    words[0] = str(BIN / words[0])
    if "--config" in words:
        config = words[words.index("--config") + 1]
        assert config in SMOKE, f"README runs {config}: give it smoke overrides in SMOKE"
        words += [*SMOKE[config], f"run.root={work / 'runs'}"]
    return words


def test_readme_block_runs_as_written(tmp_path):
    images = make_demo_data(tmp_path / "demo", num_classes=4, images_per_class=8, val_per_class=4,
                            image_size=32).imagefolder_train.parent
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["mimkit", "deepspeed", "deepspeed", "deepspeed", "mimkit", "accelerate"]
    for line in commands:
        proc = subprocess.run(smoke_form(line, tmp_path, images), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, f"$ {line}\n{proc.stdout[-4000:]}"
        assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    runs = tmp_path / "runs"
    for export in ("dvae", "beit", "milan"):
        assert (runs / export / "export" / "mimkit.json").is_file(), export
    assert (runs / "beit" / "export" / "timm_model.safetensors").is_file()
    assert (runs / "beit_ft" / "results.json").is_file()


def test_docs_and_configs_cite_nothing_outside_the_repository():
    files = [ROOT / name for name in ("README.md", "ARCHITECTURE.md", "RECIPES.md", "BENCHMARKS.md")]
    files += sorted((ROOT / "configs").rglob("*.yaml"))
    for path in files:
        text = path.read_text()
        assert "FIELD_NOTES" not in text and "../shared" not in text, path
