"""Typed configs: a YAML file plus dotted ``key=value`` overrides, checked against a dataclass schema.

Every entry point (``tokenizers``, ``pretrain``, ``finetune``) describes its config as nested
dataclasses and calls :func:`parse_cli`. OmegaConf does the merging and type checks; this module
turns its errors into messages that name the key and suggest the closest valid one, and raises them
before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem a user must fix: unknown key, wrong type, missing file."""


def schema_keys(schema: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a dataclass schema (leaves and inner nodes)."""
    keys = []
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        keys.append(key)
        ftype = field.type if not isinstance(field.type, str) else None
        default = getattr(schema, field.name, None) if not isinstance(schema, type) else None
        sub = None
        if dataclasses.is_dataclass(default):
            sub = default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = field.default_factory()  # type: ignore[misc]
            if dataclasses.is_dataclass(value):
                sub = value
        elif ftype is not None and dataclasses.is_dataclass(ftype):
            sub = ftype
        if sub is not None:
            keys.extend(schema_keys(sub, prefix=f"{key}."))
    return keys


def _closest(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # try matching the last component alone ("lr" -> "optim.lr")
        leaf = key.rsplit(".", 1)[-1]
        match = [c for c in candidates if c.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{match[0]}'?)" if match else ""


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError):
        hint = _closest(str(key), schema_keys(schema))
        return ConfigError(f"unknown config key '{key}' in {source}{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' in {source}: {msg}")
    return ConfigError(f"config error at '{key}' in {source}: {str(err).splitlines()[0]}")


def load_config(schema: type[T], config_file: str | os.PathLike | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Merge defaults <- YAML file <- overrides and return a validated instance of ``schema``."""
    cfg = OmegaConf.structured(schema)
    layers: list[tuple[str, DictConfig]] = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append((str(path), OmegaConf.load(path)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override '{bad[0]}' is not of the form dotted.key=value")
    if overrides:
        layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, source) from None
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"config key '{missing[0]}' has no value: set it in the file or as {missing[0]}=...")
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "config") from None
    return obj  # type: ignore[return-value]


def table_entry(table: dict[str, str], name: str, key: str) -> Any:
    """The object a stage's explicit table names for `name` ("module:attribute", imported now: a run imports
    only what it picks); an unknown name is a ConfigError on config key `key`, with the closest known name."""
    if name not in table:
        match = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ConfigError(f"bad value for config key '{key}': {name!r}{hint}; known: {sorted(table)}")
    module, attribute = table[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def load_section(schema: type[T], values: Any, prefix: str) -> T:
    """A config section whose schema is chosen at run time (pretraining's `method`, picked by
    `objective`): validate `values` (a dict, or None for the defaults) against `schema`; errors name
    the key as `prefix.key`."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = OmegaConf.to_container(OmegaConf.structured(values))
    section = OmegaConf.structured(schema)
    try:
        section = OmegaConf.merge(section, OmegaConf.create(values or {}))
        return OmegaConf.to_object(section)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
        full = f"{prefix}.{key}"
        if isinstance(err, ConfigKeyError):
            hint = _closest(full, [f"{prefix}.{k}" for k in schema_keys(schema)])
            raise ConfigError(f"unknown config key '{full}' for {schema.__name__}{hint}") from None
        raise ConfigError(f"bad value for config key '{full}': {str(err).splitlines()[0]}") from None


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(config))
    os.replace(tmp, path)


def parse_cli(schema: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
              description: str | None = None, finish: Callable[[T], T] | None = None) -> T:
    """``--config FILE [dotted.key=value ...]``; also accepts the ``--local_rank`` that launchers pass.
    ``finish(cfg)`` completes the config (a section chosen by another key); its ConfigErrors are
    reported like the schema's."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(schema, args.config, args.overrides)
        return finish(cfg) if finish is not None else cfg
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
