"""What the tabs' view classes share: the one-line error shown in a message box (and as a toast), and the runs
folder with the folders a form may read from."""

from __future__ import annotations

import gradio as gr

from . import runs


def err(exc: Exception) -> str:
    return f"⚠ {exc}"


def toast_error(exc: Exception) -> str:
    """The one-line error for the message box, also shown as a warning toast."""
    gr.Warning(str(exc))
    return err(exc)


class RunsFolderViews:
    """Views over `runs_dir` whose forms may also read files under `read_roots` (default: the runs folder's)."""

    def __init__(self, runs_dir: str, read_roots: list[str] | None = None):
        self.runs_dir = runs_dir
        self.read_roots = read_roots if read_roots is not None else runs.default_read_roots(runs_dir)
