"""User-facing errors: one line naming the file, the field and what was expected.

Every command runs its `main` through `cli_main`, which turns a `UserError` into that single line on
stderr and a non-zero exit, so a user mistake never shows a Python traceback. Bugs still raise.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in what the user gave us (a path, a flag, a file's content)."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class Interrupted(BaseException):
    """A stop signal while the models load (nothing is trained yet, so the run ends at once), or before
    the run began. The command prints its message and exits 128 + signum."""

    def __init__(self, signum: int, when: str = "while loading: nothing trained yet"):
        super().__init__(f"stopped by signal {signum} {when}")
        self.signum = signum


def cli_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a command's main; exit 2 with one line on a UserError."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
