"""`python -m calligrapher_rl.data validate PATH`: every problem of a dataset, one per line.

Unlike `load_dataset`, which stops at the first problem, this reads every entry and every image
(fully decoded, so a truncated file is caught) and reports all of them, each naming the dataset file,
the line or entry, the field and what is wrong, so a user can fix a file in one pass.
"""

from __future__ import annotations

import re

from ..errors import UserError
from .entries import image_problems, parse_entries

_PLACE = re.compile(r" (?:line|entry) (\d+): ")


def _place(message: str) -> int:
    """The line/entry number a problem names (-1 for problems of the whole file), for ordering."""
    m = _PLACE.search(message)
    return int(m.group(1)) if m else -1


def check_dataset(path) -> tuple[list[str], int]:
    """(problem lines in file order, number of entries seen). No lines means the dataset is usable."""
    from . import resolve_dataset_path

    try:
        path = resolve_dataset_path(path)
    except UserError as exc:
        return [str(exc)], 0
    entries, problems = parse_entries(path, keep_invalid=True)
    for entry in entries:
        problems.extend(image_problems(entry))
    lines = sorted((str(p) for p in problems), key=_place)  # stable: an entry's problems keep their order
    seen = {_place(e.loc + ": ") for e in entries} | {_place(line) for line in lines}
    return lines, len(seen - {-1})
