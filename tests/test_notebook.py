"""Notebook use: a method file pasted whole into a kernel cell, and the README's Colab cells run in order.

Both run in a subprocess that looks like a Jupyter / Colab kernel: `sys.argv` is the kernel's
(`.../ipykernel_launcher.py -f .../kernel-1234.json`), code runs in a `__main__` namespace, and the modules only
Colab has (`google.colab`, `IPython.display`) are replaced by small stand-ins that check what they are given.
"""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_ARGV = ["/usr/local/lib/python3.11/dist-packages/ipykernel_launcher.py", "-f",
               "/root/.local/share/jupyter/runtime/kernel-1234.json"]
METHODS = ("madm.py", "ptdiffseg.py", "diff.py", "iccld.py")


def _kernel(driver: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import sys, types
        sys.argv = {KERNEL_ARGV!r}
        sys.path.insert(0, {str(ROOT)!r})
        def cell(code, ns):
            exec(compile(code, "<cell>", "exec"), ns)
    """)
    path = cwd / "kernel_driver.py"
    path.write_text(prelude + textwrap.dedent(driver))
    return subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_a_method_file_pasted_into_a_cell_defines_args_and_main_and_parses_nothing(tmp_path):
    """Each file's whole text run as one cell: no SystemExit from the kernel's `-f kernel.json`, one line saying
    how to run, `Args` and `main` defined; then `main(Args(...))` from that namespace trains and evaluates."""
    r = _kernel(f"""
        import json
        out = {{}}
        for name in {list(METHODS)!r}:
            ns = {{"__name__": "__main__"}}
            try:
                cell(open({str(ROOT)!r} + "/" + name).read(), ns)
            except SystemExit as e:
                raise AssertionError(f"{{name}}: SystemExit({{e.code}})")
            out[name] = sorted(k for k in ("Args", "main") if k in ns)
        args = ns["Args"](demo=True, iters=2, iters_stage2=1, out="runs/pasted")   # the last one: iccld.py
        res = ns["main"](args)
        out["miou"] = res["miou"]
        print("RESULT " + json.dumps(out))
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "unrecognized arguments" not in r.stderr
    res = json.loads(r.stdout.split("RESULT ")[-1])
    assert all(res[m] == ["Args", "main"] for m in METHODS)
    assert r.stdout.count("run main(Args(demo=True))") == len(METHODS)
    assert res["miou"] == res["miou"]  # a number, not NaN: the pasted main ran the whole loop


def _colab_cells() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Colab\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_colab_cells_run_in_order_in_a_kernel(tmp_path):
    """Every Python cell of the README's Colab section, in order, except the first (clone + install). Drive is a
    local folder holding the synthetic sample; the real run (cell 5) is shrunk to the tiny SD and two steps by
    adding `demo=True, iters=2, ttda_steps=1` to its Args, so it runs the same code path with the cell's own flags;
    the demo cell runs 4 steps instead of 40 (the whole demo is tests/test_madm.py's test_demo_end_to_end)."""
    cells = _colab_cells()
    assert len(cells) >= 5 and all(ln.startswith(("!", "%", "#")) for ln in cells[0].strip().splitlines())
    drive_root = tmp_path / "content" / "drive"
    runnable = []
    for code in cells[1:]:
        code = code.replace("/content/drive", str(drive_root))
        if "from google.colab import drive" not in code and "Args(src=" in code:
            code = code.replace("Args(src=", "Args(demo=True, iters=2, ttda_steps=1, src=", 1)
        code = code.replace("main(Args(demo=True))", "main(Args(demo=True, iters=4, eval_every=4, ckpt_every=4))")
        runnable.append(code)
    assert any("demo=True, iters=2" in c for c in runnable), "the real-run cell was not found"
    r = _kernel(f"""
        import json, types
        from pathlib import Path
        shown = []
        def mount(path):
            from common.synthetic import ensure_synthetic_sample
            ensure_synthetic_sample(Path(path) / "MyDrive" / "datasets")
        colab = types.ModuleType("google.colab")
        colab.drive = types.SimpleNamespace(mount=mount)
        sys.modules["google"] = types.ModuleType("google")
        sys.modules["google.colab"] = colab
        class Image:
            def __init__(self, filename):
                from PIL import Image as PIL
                PIL.open(filename).verify()         # a real, complete picture
                self.filename = filename
        display_mod = types.ModuleType("IPython.display")
        display_mod.Image = Image
        display_mod.display = lambda obj: shown.append(obj.filename)
        sys.modules["IPython"] = types.ModuleType("IPython")
        sys.modules["IPython"].get_ipython = lambda: None         # as outside an interactive shell
        sys.modules["IPython"].version_info = (8, 30, 0, "")      # matplotlib looks at it
        sys.modules["IPython.display"] = display_mod
        ns = {{"__name__": "__main__"}}
        for code in {runnable!r}:
            cell(code, ns)
        print("RESULT " + json.dumps({{"shown": shown, "miou": ns["result"]["miou"]}}))
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ")[-1])
    assert any(p.endswith(".png") and "predictions" in p for p in res["shown"])
    assert any(p.endswith("curves.png") for p in res["shown"])
    assert "resumed from" in r.stdout
    run = drive_root / "MyDrive" / "runs" / "ptdiffseg-gta5-cityscapes"
    assert (run / "metrics.json").exists() and list((run / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("name", METHODS)
def test_main_imported_from_a_module_never_reads_sys_argv(name, monkeypatch):
    """`from madm import Args, main` in a kernel: building Args and main's argument handling never look at the
    kernel's argv (--eval-only without --ckpt is refused from Args, not from the command line)."""
    import importlib
    from common.cli import UserError
    monkeypatch.setattr(sys, "argv", KERNEL_ARGV)
    mod = importlib.import_module(name[:-3])
    with pytest.raises(UserError, match="--ckpt"):
        mod.main(mod.Args(eval_only=True, demo=True))
