from dataclasses import dataclass, field

import pytest

from mimkit.config import ConfigError, load_config, parse_cli, save_config


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


def test_parse_cli_accepts_local_rank_and_exits_on_error(capsys):
    cfg = parse_cli(Schema, ["--local_rank=0", "steps=3"])
    assert cfg.steps == 3
    with pytest.raises(SystemExit):
        parse_cli(Schema, ["bogus=1"])
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Schema, None, ["optim.lr=0.25"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Schema, tmp_path / "run" / "config.yaml").optim.lr == 0.25
