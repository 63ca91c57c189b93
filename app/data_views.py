"""The Dataset tab: point at a dataset, page through its examples, validate it, build a synthetic set.

A dataset path must lie where runs may read (runs_dir, the repository, the caches, `--allow_read` folders);
synthetic sets are written to runs_dir/datasets/NAME (a folder the studio owns), never elsewhere.
"""

from __future__ import annotations

import os

import gradio as gr

from calligrapher_rl.errors import UserError

from . import runs
from .view_common import RunsFolderViews, err

PAGE = 6  # examples per page (three pictures each)


class DataViews(RunsFolderViews):
    def _path(self, path: str) -> str:
        from calligrapher_rl.data import BUNDLED, BUNDLED_GLYPHS, resolve_dataset_path

        path = (path or "").strip()
        if not path:
            raise UserError("Dataset: type a path (a .jsonl/.json file or a folder), 'bundled' or 'bundled-glyphs'")
        if path.lower() in (BUNDLED, BUNDLED_GLYPHS):  # the built-in sets (the tiny presets train on bundled-glyphs)
            return resolve_dataset_path(path)
        return runs.confine(path, self.read_roots, "dataset (add its folder with python app.py --allow_read DIR)")

    def show(self, path: str, page) -> dict:
        """One page of examples: source, mask and reference of each, captioned with its text."""
        from calligrapher_rl.data.entries import parse_entries, read_entry_images

        try:
            real = self._path(path)
            entries, problems = parse_entries(real)
            if not entries:
                raise UserError(str(problems[0]) if problems else "no entries", where=path)
        except UserError as exc:
            gr.Warning(str(exc))
            return {"data_gallery": [], "data_msg": err(exc)}
        pages = max(1, -(-len(entries) // PAGE))
        page = min(max(1, int(page or 1)), pages)
        gallery, bad = [], 0
        for e in entries[(page - 1) * PAGE: page * PAGE]:
            try:
                source, mask, reference = read_entry_images(e)
            except UserError:
                bad += 1  # listed by Validate
                continue
            gallery += [(source, f"{e.id} · source · “{e.text}”"), (mask.convert("RGB"), f"{e.id} · mask"),
                        (reference, f"{e.id} · reference")]
        msg = (f"`{real}`: {len(entries)} usable entries, page {page} of {pages}"
               + (f"; {len(problems) + bad} problem(s) (press **Validate**)" if problems or bad else ""))
        return {"data_gallery": gallery, "data_msg": msg, "data_page": page}

    def validate(self, path: str) -> dict:
        """`python -m calligrapher_rl.data validate`: every problem, one per line (images decoded)."""
        from calligrapher_rl.data.validate import check_dataset

        try:
            real = self._path(path)
        except UserError as exc:
            return {"data_problems": err(exc)}
        problems, n = check_dataset(real)
        if not problems:
            gr.Info(f"{n} entries, no problem")
            return {"data_problems": f"✓ `{real}`: {n} entries, no problem"}
        gr.Warning(f"{len(problems)} problem(s) in the dataset")
        shown = problems[:200]
        more = f"\n… and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        return {"data_problems": f"⚠ {len(problems)} problem(s) in {n} entries:\n```\n" + "\n".join(shown) + more
                                 + "\n```"}

    def synth(self, name: str, n, resolution, seed) -> dict:
        """`python -m calligrapher_rl.data synth` into runs_dir/datasets/NAME; the path goes to the form."""
        from calligrapher_rl.data.synth import synthesize

        try:
            name = runs.check_name(name, "dataset name")
            out = os.path.join(self.runs_dir, "datasets", name)
            if os.path.exists(os.path.join(out, "data.jsonl")):
                raise UserError(f"a dataset named {name!r} already exists", where=out)
            for label, value in (("examples", n), ("resolution", resolution), ("seed", seed)):
                if value is None or float(value) != int(value):
                    raise UserError(f"{label}: expected a whole number, got {value!r}")
            path = str(synthesize(out, n=int(n), resolution=int(resolution), seed=int(seed)))
        except UserError as exc:
            gr.Warning(str(exc))
            return {"data_msg": err(exc)}
        gr.Info(f"Built {int(n)} examples in {path}")
        return {**self.show(path, 1), "data_path": path,
                "data_msg": f"✓ built {int(n)} synthetic examples: `{path}` (use it as the Dataset in the Train form)"}
