"""Reading flag values into a TrainConfig: the fields' types, preset files, and the command line.

Everything here turns text from outside (a preset's TOML/JSON table, an earlier run's run.json, argv) into
typed values of `config.TrainConfig`, with one-line UserErrors naming the file or flag. `calligrapher_rl.config`
re-exports the public names (`parse_args`, `load_preset`, `FIELDS`, ...), so callers import them from there;
this module imports `config`, and `config` reaches back here only lazily (no import cycle at load time).
No torch import here: the studio and `--help` load this module cheaply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from calligrapher_rl.config import RETIRED_FIELDS, VERSION_KEY, TrainConfig
from calligrapher_rl.config_validate import ConfigError, has_type
from calligrapher_rl.errors import UserError

__all__ = ["FIELDS", "PRESETS_DIR", "build_parser", "coerce_values", "field_type", "find_preset", "list_presets",
           "load_preset", "parse_args"]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


# ---------------------------------------------------------------------------------------------------------
# Types of the fields
_HINTS = typing.get_type_hints(TrainConfig)
FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field's annotation."""
    hint = _HINTS[name]
    args = typing.get_args(hint)
    if args:  # X | None
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _type_name(name: str) -> str:
    base, optional = field_type(name)
    return base.__name__ + (" or null" if optional else "")


def coerce_values(data: dict[str, Any], where: str, *, allow_preset: bool = False) -> dict[str, Any]:
    """Check the keys and value types of a preset / run.json mapping; ints are accepted for floats."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "preset" and not allow_preset:
            raise UserError("a preset cannot name another preset", where=where, field=key)
        if key not in FIELDS:
            raise UserError("unknown key (not a flag of calligrapher_rl.train); see --help", where=where, field=key)
        base, optional = field_type(key)
        if value is None and optional:
            out[key] = None
            continue
        if key == "rl_sde_window_range" and isinstance(value, list) and len(value) == 2 \
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = f"{value[0]},{value[1]}"
        if not has_type(value, base):
            raise UserError(f"expected {_type_name(key)}, got {type(value).__name__} {value!r}", where=where, field=key)
        out[key] = float(value) if base is float else value
    return out


# ---------------------------------------------------------------------------------------------------------
# Presets
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml")) if PRESETS_DIR.is_dir() else []


def find_preset(name_or_path: str) -> Path:
    """A name looks up presets/NAME.toml next to the package; anything path-like is a file."""
    p = Path(name_or_path).expanduser()
    if p.suffix.lower() in (".toml", ".json") or os.sep in name_or_path or "/" in name_or_path or p.is_file():
        if not p.is_file():
            raise UserError("no such preset file", where=str(p), field="--preset")
        return p
    for suffix in (".toml", ".json"):
        cand = PRESETS_DIR / f"{name_or_path}{suffix}"
        if cand.is_file():
            return cand
    raise UserError(f"unknown preset {name_or_path!r}; available: {', '.join(list_presets()) or 'none'} "
                    f"(in {PRESETS_DIR}), or give a .toml/.json path", field="--preset")


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """The flag values of a preset (TOML, or JSON such as an earlier run's run.json), type-checked."""
    path = find_preset(str(name_or_path))
    where = str(path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse ({exc})", where=where) from None
    if not isinstance(data, dict):
        raise UserError("expected a table of flag values", where=where)
    if data.pop(VERSION_KEY, None) is not None:  # an earlier run's run.json: rerun its configuration
        data.pop("preset", None)
        for key in RETIRED_FIELDS:
            data.pop(key, None)
    return coerce_values(data, where)


# ---------------------------------------------------------------------------------------------------------
# Command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through cli_main instead of usage + exit
        raise UserError(message, where="command line")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_optional_bool(text: str) -> bool | None:
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or none, got {text!r}") from None


def _nullable(base: type):
    def conv(text: str):
        return None if text.strip().lower() in ("none", "null") else base(text)

    conv.__name__ = base.__name__  # argparse names the type in its error message
    return conv


def _show(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_METAVARS = {"preset": "NAME_OR_PATH", "pretrained_model_name_or_path": "PATH", "siglip_path": "PATH",
             "initial_ip_adapter_path": "PATH", "train_data_json": "PATH", "output_dir": "DIR",
             "logging_dir": "DIR", "resume_from_checkpoint": "latest|PATH", "rewards": "NAME:W,...",
             "reward_server_url": "URL[,URL]", "rl_sde_window_range": "LO,HI",
             "lora_modules": "NAME,..."}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m calligrapher_rl.train", allow_abbrev=False, argument_default=argparse.SUPPRESS,
        usage="%(prog)s [--preset NAME_OR_PATH] [--FLAG VALUE ...]",
        epilog=f"presets: {', '.join(list_presets()) or 'none'} (in {PRESETS_DIR}).",
        description="Fine-tune the Calligrapher style adapter on FLUX.1-Fill with online RL (GRPO, DiffusionNFT, AWM). "
                    "Precedence: defaults < --preset < flags on the command line. Optional values accept 'none'.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in FIELDS.items():
        group = groups.get(f.metadata["group"]) or groups.setdefault(
            f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        base, optional = field_type(name)
        help_text = f.metadata["help"]
        if "(required)" not in help_text:
            help_text += f" (default: {_show(f.default)})"
        help_text = help_text.replace("%", "%%")
        kwargs: dict[str, Any] = {"help": help_text}
        if base is bool:
            kwargs.update(nargs="?", const=True, type=_parse_optional_bool if optional else _parse_bool,
                          metavar="true|false|none" if optional else "true|false")
        else:
            kwargs["type"] = _nullable(base) if optional else base
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            else:
                kwargs["metavar"] = _METAVARS.get(name) or {int: "N", float: "X"}.get(base, "TEXT")
        group.add_argument(f"--{name}", **kwargs)
    return parser


def parse_args(argv: list[str] | None = None, *, validate: bool = True) -> TrainConfig:
    """Defaults < preset < typed flags; validated (unless validate=False) and resolved."""
    typed = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    preset_where = None
    if typed.get("preset"):
        preset_where = str(find_preset(typed["preset"]))
        values.update(load_preset(typed["preset"]))
    values.update(typed)
    cfg = TrainConfig(**values)
    if validate:
        try:
            cfg.validate()
        except ConfigError as exc:
            if preset_where and exc.flag in values and exc.flag not in typed:
                raise UserError(str(exc), where=preset_where) from None
            raise
    return cfg.resolved()
