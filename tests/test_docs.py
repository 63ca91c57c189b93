"""Every python block of every file in docs/ runs: people copy them.

Convention (README.md, "Docs"): a block fenced ```python runs as it stands, in a fresh namespace, from an
empty folder; a block that only shows a signature or a formula sketch is fenced ```python signature and is
skipped. A block that a more specific test runs (and checks the output of) is skipped here by name.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
# (file, a line of the block) -> the test that runs it
RUN_ELSEWHERE = {("library.md", "trainer = Trainer(config, rewards="): "test_library.py::test_the_docs_example_runs"}


def _blocks():
    for path in sorted((ROOT / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            yield pytest.param(path.name, match.group(1).split(), match.group(2), id=f"{path.name}:{line}")


@pytest.mark.parametrize("name,tags,code", list(_blocks()))
def test_every_python_block_in_docs_runs(name, tags, code, tmp_path, monkeypatch):
    if tags:
        assert tags == ["signature"], f"{name}: unknown block tag {tags} (only 'signature')"
        pytest.skip("a signature or sketch")
    for (file, marker), test in RUN_ELSEWHERE.items():
        if file == name and marker in code:
            module, func = test.split("::")
            assert f"def {func}(" in (ROOT / "tests" / module).read_text(), test
            pytest.skip(f"run by {test}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{name}", "exec"), {"__name__": "docs_block"})
