"""Every problem of the Train form at once, in the form's words.

The trainer's validation stops at the first bad flag. Check shows them all: after each problem found, the
flag is set to a harmless stand-in and the validation runs again, until it passes (or stops finding new
flags). Messages name the form's label before the flag ("Dataset (--train_data_json): required"), as the
page shows it, not the command line's "--train_data_json: required (see --help), got None".
"""

from __future__ import annotations

import re

from calligrapher_rl.config import FIELDS
from calligrapher_rl.config_parse import parse_args
from calligrapher_rl.config_validate import ConfigError
from calligrapher_rl.errors import UserError

from . import presets

LABELS = {flag: label for flag, label, _ in presets.FORM}
MAX_ROUNDS = 30
_FLAG = re.compile(r"(?<![\w(])--([a-z0-9_]+)")


def labelled(message: str) -> str:
    """'--flag: ...' -> 'Label (--flag): ...' for the form's flags; "(see --help)" and "got None" reworded."""
    message = message.replace(" (see --help)", "").replace(", got None", ", got nothing")
    return _FLAG.sub(lambda m: f"{LABELS[m.group(1)]} (--{m.group(1)})" if m.group(1) in LABELS else m.group(0),
                     message)


def form_problems(form: list) -> list[str]:
    """Each form field's own problem (a number that is not one, a required field left empty)."""
    out = []
    for (flag, _, _), raw in zip(presets.FORM, form):
        try:
            presets._to_value(flag, raw)
        except UserError as exc:
            out.append(str(exc))
    return out


def _stand_in(flag: str) -> str:
    default = FIELDS[flag].default if flag in FIELDS else None
    if default is None or isinstance(default, bool):
        return "x" if default is None else str(default).lower()
    return str(default)


def config_problems(argv: list[str]) -> list[str]:
    """Every flag the trainer's validation refuses (labelled), found one after another."""
    problems, seen, argv = [], set(), list(argv)
    for _ in range(MAX_ROUNDS):
        try:
            parse_args(argv)
            return problems
        except ConfigError as exc:
            if exc.flag in seen:  # its stand-in is refused too (a combination): reported once
                return problems
            seen.add(exc.flag)
            problems.append(labelled(str(exc)))
            argv = [*argv, f"--{exc.flag}", _stand_in(exc.flag)]
        except UserError as exc:
            return [*problems, labelled(str(exc))]
        except SystemExit:  # argparse refused a value (its message went to stderr)
            return [*problems, "a flag could not be parsed: see the Extra flags box"]
    return problems
