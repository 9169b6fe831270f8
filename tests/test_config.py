from dataclasses import dataclass, field

import pytest

from mimkit.config import ConfigError, load_config, parse_cli, save_config
from mimkit.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    weight_decay: float = 0.05


@dataclass
class Schema:
    name: str = "run"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\noptim:\n  lr: 0.5\n")
    cfg = load_config(Schema, f, ["optim.weight_decay=0.1"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.weight_decay, cfg.name) == (20, 0.5, 0.1, "run")


def test_unknown_key_is_named_with_suggestion():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(Schema, None, ["optim.lrr=1"])


def test_unknown_leaf_suggests_full_key():
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.weight_decay'"):
        load_config(Schema, None, ["weight_decay=1"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'steps'"):
        load_config(Schema, None, ["steps=many"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Schema, tmp_path / "nope.yaml")


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  betas: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.betas.*c\.yaml"):
        load_config(Schema, f)


def test_parse_cli_accepts_local_rank_and_raises_user_errors():
    cfg = parse_cli(Schema, ["--local_rank=0", "steps=3"])
    assert cfg.steps == 3
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        parse_cli(Schema, ["bogus=1"])
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):  # argparse's own, as one line too
        parse_cli(Schema, ["--bogus"])


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Schema, None, ["optim.lr=0.25"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Schema, tmp_path / "run" / "config.yaml").optim.lr == 0.25


def test_help_lists_every_key_with_type_default_and_doc(capsys):
    """`pretrain --help`: the schema's keys grouped by section, each objective's `method` keys, docs from
    the comments beside the fields."""
    from mimkit.pretrain.trainer import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    lr = next(line for line in lines if line.split()[:1] == ["optim.lr"])
    assert lr.split()[1:4] == ["float", "=", "0.0015"], lr
    steps = next(line for line in lines if line.split()[:1] == ["run.steps"])
    assert "optimizer steps" in steps  # the comment beside the field
    assert "[optim]" in lines and "[model]" in lines
    for objective in ("beit | peco", "mae", "milan"):
        assert any(line.startswith("[method] with objective=") and objective in line for line in lines), objective
    assert any(line.split()[:1] == ["method.teacher.export"] for line in lines)  # nested sections expanded
    assert any(line.split()[:1] == ["method.mask_ratio"] for line in lines)
