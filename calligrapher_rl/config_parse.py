"""Reading flag values into a TrainConfig from outside: preset files and the command line.

A preset's TOML/JSON table and argv become typed values of `config.TrainConfig` (the fields' types and their
check, `coerce_values`, live beside the fields in `config`), with one-line UserErrors naming the file or flag.
This module imports `config`, never the other way round. No torch import here: the studio and `--help` load it
cheaply.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from calligrapher_rl.config import FIELDS, RETIRED_FIELDS, VERSION_KEY, TrainConfig, coerce_values, field_type
from calligrapher_rl.config_validate import ConfigError
from calligrapher_rl.errors import UserError

__all__ = ["FIELDS", "PRESETS_DIR", "build_parser", "coerce_values", "field_type", "find_preset", "list_presets",
           "load_preset", "parse_args"]

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


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
