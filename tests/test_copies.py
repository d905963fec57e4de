"""Deliberate copies between method files stay identical to their originals.

A method file may copy a helper from another method file (CleanRL duplicates on purpose, so that a reader of one
file never opens another). Each copy is tagged by a comment line directly above its `def` / `class`:
`# Same as madm.py:ema_update`. This test finds every tag and compares the two definitions' source text, like
diffusers' `utils/check_copies.py` does for `# Copied from`.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["madm.py", "ptdiffseg.py", "diff.py", "iccld.py"]
TAG = re.compile(r"^\s*# Same as (\w+\.py):(\w+)\s*$")


def _definitions(path: Path) -> dict[str, str]:
    source = path.read_text()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out[node.name] = "\n".join(lines[start - 1: node.end_lineno])
    return out


def _tags():
    found = []
    for name in METHODS:
        path = ROOT / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = TAG.match(line)
            if m:
                nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
                found.append((name, i + 1, m.group(1), m.group(2), nxt))
    return found


def test_every_tag_sits_on_a_definition():
    for name, lineno, _, func, nxt in _tags():
        assert re.match(rf"(def|class) {func}\b|@", nxt), f"{name}:{lineno}: tag not directly above `{func}`"


@pytest.mark.parametrize("copy_file,lineno,orig_file,func,_", _tags() or [pytest.param(*[None] * 5,
                         marks=pytest.mark.skip(reason="no tagged copies yet"))])
def test_tagged_copy_is_identical_to_its_original(copy_file, lineno, orig_file, func, _):
    orig = _definitions(ROOT / orig_file)
    copy = _definitions(ROOT / copy_file)
    assert func in orig, f"{orig_file} has no `{func}` (tag at {copy_file}:{lineno})"
    assert copy[func] == orig[func], f"{copy_file}:{func} drifted from {orig_file}:{func}"
