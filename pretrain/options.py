"""Typed options for the training scripts: dataclasses -> command line, validation, OUT/config.yaml.

Each script describes its options once, as a dataclass whose fields carry their help text
(`opt(default, "help", ...)`). From that one description:

    parse_options(Cls, argv)   builds an argparse parser (kebab-case flags, `--help` from the
                               field docs with defaults), reads `--run-config FILE` (a config.yaml
                               of an earlier run; flags given beside it override it), converts
                               the values to the field types and validates everything in one
                               place: choices, minimums, required fields, then the dataclass's
                               own `problems()` for rules that involve several fields. Bad input
                               exits with code 2 and one message naming every bad flag.
    write_run_config(...)      OUT/config.yaml: the fully resolved options plus what the run
                               resolved at start (backends, sharding, world size), atomically.

Why argparse and not jsonargparse (which litgpt uses): the command lines in README and docs
must keep working unchanged, and they use argparse idioms that jsonargparse spells
differently: `--data A:0.7 B:0.3` (space-separated lists; jsonargparse wants `--data+` or a
JSON list) and bare switches such as `--activation-checkpointing` (jsonargparse's booleans
take a value). A hundred lines over the standard library keep every flag as it was and add
no dependency besides PyYAML, which Lightning already requires.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from model.atomic import write_text

RUN_CONFIG_FILE = "config.yaml"
_REQUIRED = dataclasses.MISSING


def opt(default: Any = _REQUIRED, help: str = "", *, choices=None, minimum: float | None = None,
        metavar: str | None = None, hidden: bool = False) -> Any:
    """A dataclass field that is also a command-line flag.

    `default` MISSING makes the flag required (unless --run-config gives it); `minimum` is
    checked in validation; `hidden` keeps debug hooks out of `--help`.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum,
            "metavar": metavar, "hidden": hidden}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp):
    """(inner type, optional?) of `X | None` / Optional[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _base_type(tp):
    """(scalar type, is_list) of a field type: int, float, str, Path, bool, or list[...] of them."""
    tp, _ = _unwrap_optional(tp)
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(value, tp, where: str):
    """Convert a value from the command line or a YAML file to the field's type."""
    if value is None:
        return None
    scalar, is_list = _base_type(tp)
    if is_list:
        # A list of numbers: "0.1,5.0", "0.1 5.0" (argparse's nargs) and a YAML list or string all
        # mean the same list. Strings (paths) are never split on commas.
        items = value if isinstance(value, (list, tuple)) else [value]
        if scalar in (int, float):
            items = [part for v in items for part in (v.split(",") if isinstance(v, str) else [v])
                     if not isinstance(part, str) or part.strip()]
        try:
            return [_coerce(v.strip() if isinstance(v, str) else v, scalar, where) for v in items]
        except ValueError:
            kind = "numbers" if scalar in (int, float) else f"{scalar.__name__} values"
            given = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            raise ValueError(f"{where} must be {kind} separated by commas or spaces, got {given!r}") from None
    if scalar is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    try:
        return scalar(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: expected {scalar.__name__}, got {value!r}") from e


def _jsonable(value):
    """Plain YAML/JSON scalars: paths, versions and other str subclasses become str."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (bool, int, float)):
        return type(value).__mro__[1](value) if type(value) is not bool else bool(value)
    return str(value)


def as_dict(options) -> dict:
    """The options as plain YAML/JSON values (paths as strings), in field order."""
    return {f.name: _jsonable(getattr(options, f.name)) for f in dataclasses.fields(options)}


def build_parser(cls, description: str, epilog: str = "") -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run-config", type=Path, default=None, metavar="FILE",
                        help=f"start from the options saved in an earlier run's OUT/{RUN_CONFIG_FILE}; "
                             f"flags given here override the file's values")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        scalar, is_list = _base_type(hints[f.name])
        help_text = argparse.SUPPRESS if meta.get("hidden") else (meta.get("help") or " ")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if scalar is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = str if scalar is Path or (is_list and scalar in (int, float)) else scalar
            if is_list:
                kwargs["nargs"] = "+"  # numbers are split on commas too, in _coerce
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        # Defaults come from the dataclass (or --run-config) after parsing, so that "not given"
        # stays distinguishable; the help still shows the dataclass default.
        kwargs["default"] = argparse.SUPPRESS
        if f.default is not _REQUIRED and help_text is not argparse.SUPPRESS:
            kwargs["help"] = f"{help_text} (default: {_default_text(f)})"
        elif f.default is _REQUIRED and f.default_factory is _REQUIRED:
            kwargs["help"] = f"{help_text} (required)"
        parser.add_argument(flag_name(f.name), **kwargs)
    return parser


def _default_text(f) -> str:
    value = f.default
    return "off" if value is False else "none" if value is None else str(value)


def _read_run_config(path: Path, cls) -> dict:
    if not path.is_file():
        raise ValueError(f"--run-config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"--run-config {path}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise ValueError(f"--run-config {path}: expected a mapping with an 'options' section "
                         f"(the {RUN_CONFIG_FILE} a run writes into its output directory)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data["options"]) - known)
    if unknown:
        raise ValueError(f"--run-config {path}: unknown option(s) {', '.join(unknown)} for this script")
    return data["options"]


def validate(options) -> list[str]:
    """Every problem with `options`, as messages naming the flag: choices, minimums, then the
    cross-field rules: `common_problems()` of the shared base (pretrain/engine.py CommonOptions)
    and the script's own `problems()`."""
    problems = []
    for f in dataclasses.fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if meta.get("choices") and any(v not in meta["choices"] for v in values):
            problems.append(f"{flag_name(f.name)} must be one of {', '.join(map(str, meta['choices']))}, "
                            f"got {value}")
        if meta.get("minimum") is not None and any(v < meta["minimum"] for v in values):
            bound = "positive" if meta["minimum"] == 1 else f">= {meta['minimum']}"
            problems.append(f"{flag_name(f.name)} must be {bound}, got {value}")
    if hasattr(options, "common_problems"):
        problems += options.common_problems()
    if hasattr(options, "problems"):
        problems += options.problems()
    return problems


def parse_options(cls, argv=None, description: str = "", epilog: str = ""):
    """Parse and validate the command line into a `cls` instance; exit 2 with a message on bad input."""
    parser = build_parser(cls, description, epilog)
    given = vars(parser.parse_args(argv))
    hints = typing.get_type_hints(cls)
    try:
        values = _read_run_config(given["run_config"], cls) if given.get("run_config") else {}
        values.update({k: v for k, v in given.items() if k != "run_config"})
        missing = [flag_name(f.name) for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is _REQUIRED and f.default_factory is _REQUIRED]
        if missing:
            raise ValueError(f"the following arguments are required: {', '.join(missing)}")
        typed = {k: _coerce(v, hints[k], flag_name(k)) for k, v in values.items()}
        options = cls(**typed)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    problems = validate(options)
    if problems:
        parser.error("; ".join(problems))
    return options


def write_run_config(out: Path, script: str, options, resolved: dict) -> Path:
    """OUT/config.yaml: the resolved options (to restart from) and what the run resolved at start."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_CONFIG_FILE
    header = (f"# Written by {script} when the run started: every option, resolved, and what it ran with.\n"
              f"# Start the same run again (flags given beside it override the file):\n"
              f"#   python {script} --run-config {path}\n")
    body = yaml.safe_dump({"options": as_dict(options), "resolved": _jsonable_tree(resolved)},
                          sort_keys=False, allow_unicode=True)
    write_text(path, header + body)
    return path


def _jsonable_tree(value):
    if isinstance(value, dict):
        return {str(k): _jsonable_tree(v) for k, v in value.items()}
    return _jsonable(value)


def script_name(file: str) -> str:
    """`pretrain/tinyllama.py` for a script's __file__, as the README writes it."""
    path = Path(file).resolve()
    return f"{path.parent.name}/{path.name}"


