"""User errors, as a person meets them: each stage, from a 2-rank launch, refuses a bad value, a missing
path, empty data, an architecture mismatch or a refused file with one line naming the key and the value,
printed once by rank 0, a non-zero exit the launcher passes on, and no Python traceback."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mimkit_test_distributed as _helper  # tests/distributed.py, registered by conftest.py
from mimkit.checkpoint.tokenizer_export import save_random_tokenizer_export
from mimkit.data.demo import make_demo_data
from mimkit.errors import USER_ERROR_EXIT_CODE
from mimkit.models.vit import ViTConfig, VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain" / "beit_tiny_cpu.yaml"
EVA = ROOT / "configs" / "pretrain" / "eva_tiny_cpu.yaml"
FINETUNE = ROOT / "configs" / "finetune" / "tiny_cpu.yaml"
TOKENIZER = ROOT / "configs" / "tokenizers" / "dvae_tiny_cpu.yaml"
FT_ENTRY = Path(__file__).parent / "dist_scripts_ft" / "finetune_entry.py"
TORCHRUN_OWN = re.compile(r"Traceback \(most recent call last\):\n  File \"[^\"]*/torchrun\"")


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    demo = make_demo_data(root / "demo", image_size=32, images_per_shard=50)
    tok = save_random_tokenizer_export(root / "tok", "dvae", input_size=32, seed=3)
    (root / "empty").mkdir()
    (root / "empty_root" / "train").mkdir(parents=True)
    torch.manual_seed(0)
    encoder = VisionTransformer(ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4))
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(root / "encoder.safetensors"))
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Payload()}, root / "evil.pth")
    with tarfile.open(root / "unlabelled-000000.tar", "w") as tar:  # images without .cls
        for i, image in enumerate(sorted(demo.imagefolder_train.rglob("*.jpg"))[:8]):
            tar.add(image, arcname=f"{i:06d}.jpg")
    return root, demo, tok


def pretrain_args(assets, *extra, config=PRETRAIN):
    root, demo, tok = assets
    return ["--config", str(config), f"run.root={root / 'runs'}", f"data.shards={demo.shards_dir}",
            f"method.tokenizer={tok}" if config == PRETRAIN else "run.name=eva", "data.num_workers=0",
            "run.steps=2", "run.export=false", *extra]


def finetune_args(assets, *extra):
    root, demo, _ = assets
    return ["--config", str(FINETUNE), f"run.root={root / 'runs'}", f"data.root={demo.imagefolder_train.parent}",
            "optim.epochs=1", "optim.max_steps=1", "aug.enabled=false", f"model.init={root / 'encoder.safetensors'}",
            *extra]


def single_message(text: str, prog: str) -> str:
    """The one line `prog` printed; fails on a Python traceback (torchrun's own summary aside) or on more."""
    assert "Traceback" not in TORCHRUN_OWN.sub("", text), text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(f"{prog}")]  # "PROG (rank 1): " too
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), text[-3000:]
    return lines[0]


def test_a_launched_stage_prints_one_line_once_and_exits_non_zero(assets):
    """A real launch: the launcher ends rank 1 once rank 0 has said what is wrong and exited."""
    root = assets[0]
    proc = _helper.run_torchrun(_helper.SCRIPTS / "run_pretrain.py",
                                pretrain_args(assets, f"method.tokenizer={root / 'nowhere'}"), cwd=root, check=False)
    assert proc.returncode != 0
    line = single_message(proc.stdout, "pretrain")
    assert f"method.tokenizer={root / 'nowhere'}: not a tokenizer export" in line


CASES = {  # name: (stage, argv builder, what rank 0's line must hold)
    "refused pickle": ("finetune", lambda a: finetune_args(a, f"model.init={a[0] / 'evil.pth'}"),
                       r"model\.init=\S+evil\.pth: .*refused to unpickle.*GLOBAL print was not an allowed global by default$"),
    "objective typo": ("pretrain", lambda a: pretrain_args(a, "objective=beat"),
                       r"config key 'objective': 'beat' \(did you mean 'beit'\?\)"),
    "empty shard folder": ("pretrain", lambda a: pretrain_args(a, f"data.shards={a[0] / 'empty'}"),
                           r"data\.shards=\S+/empty: no shards there"),
    "teacher path": ("pretrain", lambda a: pretrain_args(a, "method.teacher.kind=vit_export",
                                                         f"method.teacher.export={a[0] / 'nowhere'}", config=EVA),
                     r"method\.teacher\.export=\S+/nowhere: not a mimkit export"),
    "empty data.root": ("finetune", lambda a: finetune_args(a, f"data.root={a[0] / 'empty_root'}"),
                        r"data\.root=\S+/empty_root: .*class"),
    "architecture": ("finetune", lambda a: finetune_args(a, "model.depth=3"),
                     r"model\.depth=3: the checkpoint \(model\.init=\S+encoder\.safetensors\) has depth 2"),
    "unlabelled shards": ("finetune", lambda a: finetune_args(a, "data.format=shards",
                                                              f"data.train_shards={a[0] / 'unlabelled-000000.tar'}"),
                          r"data\.train_shards=\S+: no labelled sample \(keys found: jpg \(8\)\)"),
    "tokenizer shards": ("tokenizers", lambda a: ["--config", str(TOKENIZER), f"run.root={a[0] / 'runs'}",
                                                  f"data.shards={a[0] / 'nowhere'}/train-{{0..3}}.tar"],
                         r"data\.shards=\S+/nowhere/train-\{0\.\.3\}\.tar: 4 shard\(s\) not found"),
}


@pytest.fixture(scope="module")
def grouped(assets, tmp_path_factory):
    """Every case in one 2-rank launch (no launcher ends rank 1 between them, so it speaks after its grace:
    set to 0 here)."""
    root = assets[0]
    out = tmp_path_factory.mktemp("codes")
    (out / "cases.json").write_text(json.dumps([[stage, build(assets)] for stage, build, _ in CASES.values()]))
    proc = _helper.run_torchrun(_helper.SCRIPTS / "user_errors.py", [out / "cases.json"], cwd=root, timeout=300,
                                MIMKIT_EXIT_DIR=str(out), MIMKIT_PEER_GRACE_S="0")
    assert "payload ran" not in proc.stdout  # the refused pickle ran nothing
    return {name: [json.loads((out / f"case{i}_rank{r}.json").read_text()) for r in (0, 1)]
            for i, name in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_each_user_error_is_one_line_naming_key_and_value(grouped, case):
    stage, _, expected = CASES[case]
    rank0, rank1 = grouped[case]
    assert rank0["code"] == rank1["code"] == USER_ERROR_EXIT_CODE, (rank0, rank1)
    for record in (rank0, rank1):
        assert "Traceback" not in record["stderr"], record["stderr"]
    lines = rank0["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage}: "), rank0["stderr"]
    assert re.search(expected, lines[0]), lines[0]
    assert rank1["stderr"].strip().startswith(f"{stage} (rank 1): ")  # no launcher ended it: it names itself


def test_debug_shows_the_traceback(assets, monkeypatch, capsys):
    from mimkit.config import ConfigError
    from mimkit.pretrain.trainer import main

    assert main(pretrain_args(assets, "objective=beat")) == USER_ERROR_EXIT_CODE
    assert capsys.readouterr().err.startswith("pretrain: bad value for config key 'objective'")
    with pytest.raises(ConfigError):
        main([*pretrain_args(assets, "objective=beat"), "--debug"])
    monkeypatch.setenv("MIMKIT_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(pretrain_args(assets, "objective=beat"))


def test_mimkit_subcommands_share_the_one_line(tmp_path, capsys):
    from mimkit.cli import main

    assert main(["export", str(tmp_path / "nowhere")]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mimkit export: {tmp_path / 'nowhere'} has no config.yaml")
