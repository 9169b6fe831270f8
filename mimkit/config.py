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
import inspect
import io
import os
import textwrap
import tokenize
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mimkit.errors import BadValue, UserError, request_debug

T = TypeVar("T")


class ConfigError(BadValue):
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


# ---- --help: every key with its type, default and doc -------------------------------------------
def field_docs(schema: type) -> dict[str, str]:
    """The one-line doc of each field of a dataclass: ``field(metadata={"help": ...})``, else the comment
    on the field's line (``name: type = default  # doc``), else the comment lines right above it; a field
    a subclass inherits keeps its base class's doc."""
    docs: dict[str, str] = {}
    for base in reversed(schema.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    docs.update(_own_field_docs(schema))
    return docs


def _own_field_docs(schema: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):
        source = ""
    names = {f.name for f in dataclasses.fields(schema)}
    above: list[str] = []
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not line_tokens:
            above.append(tok.string.lstrip("#").strip())
            continue
        if tok.type in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT) and not line_tokens:
            if tok.type == tokenize.NL and tok.line.strip() == "":
                above = []  # a blank line ends a comment block
            continue
        if tok.type != tokenize.NEWLINE:
            line_tokens.append(tok)
            continue
        # a logical line ends: a field when it reads `name: ...` at the class body's indentation
        words = [t for t in line_tokens if t.type not in (tokenize.COMMENT, tokenize.NL)]
        if (len(words) > 1 and words[0].type == tokenize.NAME and words[0].string in names
                and words[1].string == ":" and words[0].start[1] == 4):
            trailing = " ".join(t.string.lstrip("#").strip() for t in line_tokens if t.type == tokenize.COMMENT)
            if trailing or above:
                docs[words[0].string] = trailing or " ".join(above)
        above, line_tokens = [], []
    for f in dataclasses.fields(schema):
        if f.metadata.get("help"):
            docs[f.name] = f.metadata["help"]
    return docs


def _type_name(ftype: Any) -> str:
    if isinstance(ftype, str):
        return ftype
    return getattr(ftype, "__name__", str(ftype))


def describe_keys(schema: Any, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) of every leaf of a dataclass schema (a class or an instance: its
    values are the defaults shown), inner sections expanded in place."""
    instance = schema if not isinstance(schema, type) else schema()
    docs = field_docs(type(instance))
    rows = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_keys(value, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", _type_name(f.type), repr(value), docs.get(f.name, "")))
    return rows


def format_keys(rows: Sequence[tuple[str, str, str, str]], title: str | None = None) -> str:
    """Aligned lines `key  type = default  doc`, under `title` when given."""
    if not rows:
        return ""
    kw = max(len(r[0]) for r in rows)
    tw = max(len(f"{r[1]} = {r[2]}") for r in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{kw}}  {f'{t} = {d}':<{tw}}  {doc}".rstrip() for k, t, d, doc in rows]
    return "\n".join(lines)


def help_text(schema: type, skip: Sequence[str] = ()) -> str:
    """Every key of `schema`, grouped by section (top-level keys first); `skip`: keys described apart."""
    rows = [r for r in describe_keys(schema) if r[0].split(".")[0] not in skip]
    top = [r for r in rows if "." not in r[0]]
    sections = [format_keys(top, "(top level)")] if top else []
    for section in dict.fromkeys(r[0].split(".")[0] for r in rows if "." in r[0]):
        sections.append(format_keys([r for r in rows if r[0].split(".")[0] == section], f"[{section}]"))
    return "\n\n".join(sections)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own problems: one line on rank 0 as the keys', not per rank
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_cli(schema: type[T], argv: Sequence[str] | None = None, prog: str | None = None,
              description: str | None = None, finish: Callable[[T], T] | None = None,
              more_help: Callable[[], str] | None = None, skip_help: Sequence[str] = ()) -> T:
    """``--config FILE [dotted.key=value ...]``; also accepts the ``--local_rank`` that launchers pass.
    ``finish(cfg)`` completes the config (a section chosen by another key); its ConfigErrors are
    reported like the schema's. Problems raise :class:`ConfigError` (a :class:`mimkit.errors.UserError`:
    the entry point's :func:`mimkit.errors.run_main` prints it once). ``--help`` lists every key of the
    schema (``skip_help``: sections left out) and ``more_help()`` (sections chosen at run time);
    ``--check`` stops after ``finish`` (so it should run the stage's checks that need no work)."""
    parser = _Parser(prog=prog, description=description, add_help=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this message, every config key, and exit")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error (or MIMKIT_DEBUG=1)")
    parser.add_argument("--check", action="store_true", help="check the config (keys, types, values) and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (keys below)")
    args = parser.parse_args(argv)
    if args.help:
        extra = more_help() if more_help is not None else ""
        print(parser.format_help() + "\nconfig keys (type = default, doc), set in the --config file or as key=value:\n\n"
              + help_text(schema, skip_help) + (f"\n\n{extra}" if extra else ""))
        raise SystemExit(0)
    if args.debug:
        request_debug()
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(schema, args.config, args.overrides)
    cfg = finish(cfg) if finish is not None else cfg
    if args.check:  # `mimkit submit` asks before a job waits in a queue to fail on a typo
        print(f"{prog}: config OK")
        raise SystemExit(0)
    return cfg
