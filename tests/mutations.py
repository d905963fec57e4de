"""Mutation check of the step tests: break one line of a method's METHOD STEP at a time (delete it, or put a
plausible wrong alternative in its place: the student where the teacher belongs, a loss term dropped, a schedule
frozen, ...), run that method's step tests on the broken copy, and expect at least one to fail.

Not collected by pytest (seconds to a minute per mutation). Run from the repository root:
    OMP_NUM_THREADS=1 python tests/mutations.py madm              # every MADM mutation; a Markdown table at the end
    OMP_NUM_THREADS=1 python tests/mutations.py iccld 3 17        # only ICCLD's mutations 3 and 17
The mutations of each method are listed in tests/<method>_mutations.py (MUTATIONS, and TESTS, the `-k` selection
of its step tests). Each one runs in a temporary copy of the method files and tests (common/, data/ and
benchmarks/ linked), so the working tree is never modified. A mutation whose text is no longer found exactly once
is reported as NOT APPLIED, a run that checked nothing (e.g. a collection error) as NOT RUN, and any mutation that
is not caught makes the exit code 1.
"""
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("madm", "ptdiffseg", "diff", "iccld")


def run_one(method: str, table, k: int, work: Path) -> tuple[str, str]:
    """-> (line number of the mutated text in the method file, the failing test or the verdict)."""
    what, old, new = table.MUTATIONS[k]
    src = (ROOT / f"{method}.py").read_text()
    if src.count(old) != 1:
        return "?", f"NOT APPLIED (found {src.count(old)} times)"
    line = src[:src.index(old) + len(old) - len(old.lstrip())].count("\n") + 1
    (work / f"{method}.py").write_text(src.replace(old, new))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf",
                           table.TEST_FILE, "-k", table.TESTS], cwd=work, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    failed = re.findall(r"^(?:FAILED|ERROR) \S+::(\S+)", proc.stdout, re.M)
    if not failed and proc.returncode != 0:  # a collection error or no test selected: nothing was checked
        return str(line), f"NOT RUN (pytest exit code {proc.returncode})"
    return str(line), (failed[0] if failed else "SURVIVED (all step tests passed)")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in METHODS:
        print(f"usage: python tests/mutations.py {{{','.join(METHODS)}}} [mutation numbers]", file=sys.stderr)
        return 2
    method = sys.argv[1]
    sys.path.insert(0, str(ROOT / "tests"))
    table = importlib.import_module(f"{method}_mutations")
    picks = [int(a) for a in sys.argv[2:]] or range(len(table.MUTATIONS))
    rows, caught = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        for name in (*[f"{m}.py" for m in METHODS], "pytest.ini"):
            shutil.copy(ROOT / name, work / name)
        for name in ("common", "data", "benchmarks"):  # benchmarks: tests/diff_reference.py counts FLOPs with it
            (work / name).symlink_to(ROOT / name)
        for k in picks:
            line, verdict = run_one(method, table, k, work)
            caught += not verdict.startswith(("NOT APPLIED", "SURVIVED", "NOT RUN"))
            rows.append(f"| {k} | {line} | {table.MUTATIONS[k][0]} | {verdict} |")
            print(rows[-1], flush=True)
    print(f"\n{method}.py: {caught} of {len(rows)} mutations caught\n\n| # | line | mutation | failing test |\n"
          "|---|---|---|---|\n" + "\n".join(rows))
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
