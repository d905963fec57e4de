"""The size and shape rules the four scripts and common/ keep (so that each script stays readable on its own and
common/ stays small): line budgets, function and class sizes, callers, and the flags that strings mention."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / f"{m}.py" for m in ("madm", "iccld", "ptdiffseg", "diff")]
COMMON = sorted(p for p in (ROOT / "common").glob("*.py") if p.name != "mini_sd.py")  # mini_sd: off the path
# What common/ is for: the SD backbone, the datasets (with the synthetic sample), the metric, DAFormer's recipe;
# everything else (command line, run folder, checkpoints, stop on a signal) shares a small budget.
DOMAIN = {"sd_backbone", "datasets", "layouts", "readers", "sampling", "synthetic", "metrics", "daformer"}


def lines(p: Path) -> int:
    return len(p.read_text().splitlines())


def test_line_budgets():
    assert all(lines(p) <= 800 for p in SCRIPTS), {p.name: lines(p) for p in SCRIPTS}
    assert sum(map(lines, COMMON)) <= 3500, sum(map(lines, COMMON))
    assert all(lines(p) <= 800 for p in COMMON), {p.name: lines(p) for p in COMMON}
    other = {p.name: lines(p) for p in COMMON if p.stem not in DOMAIN}
    assert set(other) == {"__init__.py", "cli.py", "runs.py"} and sum(other.values()) <= 250, other


def test_function_and_class_sizes():
    big = []
    for p in SCRIPTS + COMMON:
        for n in ast.walk(ast.parse(p.read_text())):
            size = getattr(n, "end_lineno", 0) - getattr(n, "lineno", 0) + 1
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > 80 or \
                    isinstance(n, ast.ClassDef) and size > 150:
                big.append((p.name, n.name, size))
    assert not big, big


def test_every_common_definition_has_a_caller_outside_the_tests():
    users = "\n".join(p.read_text() for p in [*SCRIPTS, *(ROOT / "common").glob("*.py"),
                                               *(ROOT / "benchmarks").glob("*.py")])
    unused = []
    for p in COMMON:
        for n in ast.parse(p.read_text()).body:
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                uses = len(re.findall(rf"\b{re.escape(n.name)}\b", users))
                if uses < 2:  # its own definition is one
                    unused.append((p.name, n.name))
    assert not unused, unused


def test_strings_name_only_flags_a_script_accepts():
    import dataclasses
    import importlib
    import sys
    sys.path.insert(0, str(ROOT))
    flags = {"--help", "--nproc_per_node"}  # + torchrun's
    for p in (ROOT / "common").glob("*.py"):  # the modules with a command line of their own (python -m common.X)
        flags |= set(re.findall(r"add_argument\(\"(--[a-z0-9-]+)", p.read_text()))
    for m in ("madm", "iccld", "ptdiffseg", "diff"):
        args = importlib.import_module(m).Args
        flags |= {"--" + f.name.replace("_", "-") for f in dataclasses.fields(args)}
        flags |= {"--no-" + f.name.replace("_", "-") for f in dataclasses.fields(args) if f.type in (bool, "bool")}
    unknown = set()
    for p in SCRIPTS + COMMON:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                unknown |= {(p.name, f) for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", n.value)
                            if f not in flags}
    assert not unknown, sorted(unknown)


def test_every_args_field_has_its_help():
    """--help texts: the comment after each `Args` field (common/cli.py reads them)."""
    import dataclasses
    import importlib
    import sys
    sys.path.insert(0, str(ROOT))
    from common import cli
    for m in ("madm", "iccld", "ptdiffseg", "diff"):
        args = importlib.import_module(m).Args
        docs = cli._field_docs(args)
        assert [f.name for f in dataclasses.fields(args) if not docs.get(f.name)] == [], m
