"""The command line of every script, made from its `Args` dataclass (CleanRL style), and its terminal output.
Bad input: one line on stderr, exit code 2 (`UserError`); stopped by SIGTERM / SIGINT after the checkpoint: exit 75
(`Stopped`; sysexits.h EX_TEMPFAIL: try again, with --resume)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
import typing
from typing import Any, Callable, Optional

EXIT_STOPPED = 75


class UserError(Exception):
    """Bad input: one line, `error: <what>: <what is wrong>. Expected ... <how to fix>.`; exit code 2."""


class Stopped(Exception):
    """A loop stopped by SIGTERM / SIGINT after its checkpoint (the message: the line it printed)."""


def progress(iterable: Any = None, **kwargs: Any):
    """A tqdm bar, drawn only when stdout and stderr are terminals: in a log file it would run into the lines."""
    from tqdm import tqdm
    tty = all(getattr(f, "isatty", lambda: False)() for f in (sys.stdout, sys.stderr))
    return tqdm(iterable, disable=not tty, dynamic_ncols=True, **kwargs)


def log(line: str) -> None:
    """One line on stdout, at once, without breaking a progress bar being drawn."""
    from tqdm import tqdm
    tqdm.write(line, file=sys.stdout), sys.stdout.flush()


def _field_docs(args_cls: type) -> dict[str, str]:
    """{field: its help}: the comment after `name: type = default`, plus the comment lines right under it."""
    try:
        src = textwrap.dedent(inspect.getsource(args_cls))
    except (OSError, TypeError):  # no source (e.g. exec'd): --help without texts
        return {}
    docs, field, prev = {}, None, None
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.string == ":" and prev.type == tokenize.NAME and prev.start[1] == 4:  # `name:` in the class body
            field = prev.string
        elif tok.type == tokenize.COMMENT and field:  # its help, or a section banner that ends it
            field = None if tok.string.startswith("# ----") else field
            docs.update({field: f"{docs.get(field, '')} {tok.string[1:].strip()}".strip()} if field else {})
        prev = tok
    return docs


def _parser(args_cls: type, with_defaults: bool) -> argparse.ArgumentParser:
    """One flag per field, its help the string under it; bool: also its negation; tuple[X, ...]: several values."""
    hints, docs = typing.get_type_hints(args_cls), _field_docs(args_cls)
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        tp, inner = hints[f.name], typing.get_args(hints[f.name])
        tp = inner[0] if type(None) in inner else tp  # Optional[X] -> X
        kw: dict[str, Any] = dict(default=f.default if with_defaults else argparse.SUPPRESS, help=docs.get(f.name, ""))
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=typing.get_args(tp)[0], nargs="+") if typing.get_origin(tp) is tuple else kw.update(type=tp)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def parse_args(args_cls: type, argv: Optional[list[str]] = None) -> Any:
    """The command line as an `args_cls` instance; `_given` records the flags typed (for `replace_defaults`)."""
    from common.datasets import dataset_info  # the one check of a dataset name
    ns = vars(_parser(args_cls, True).parse_args(argv))
    args = args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()})
    object.__setattr__(args, "_given", frozenset(vars(_parser(args_cls, False).parse_args(argv))))
    for flag in ("src", "tgt"):
        for name in filter(None, str(getattr(args, flag, None) or "").split(",")):
            dataset_info(name, f"--{flag}")
    return args


def replace_defaults(args: Any, **values: Any) -> Any:
    """`args` with `values` for the fields the user left at their default: `--demo --iters 5` keeps the 5."""
    given = getattr(args, "_given", frozenset())
    return dataclasses.replace(args, **{f.name: values[f.name] for f in dataclasses.fields(args) if f.name in values
                                        and f.name not in given and getattr(args, f.name) == f.default})


def run_cli(main: Callable[[Any], Any], args_cls: type, argv: Optional[list[str]] = None) -> None:
    """Run `main(parse_args(...))`: exit 2 on a UserError (one line), 75 when stopped. Pasted into a notebook cell
    (`__main__` there too) it parses nothing (the kernel's `-f kernel.json` would fail) and says what to call."""
    if argv is None and sys.argv and sys.argv[0].endswith("kernel_launcher.py"):
        name = args_cls.__name__
        return print(f"{name} and main are defined; run main({name}(demo=True)) for the demo, or "
                     f"main({name}(src=..., tgt=..., ...)) (the kernel's command line is not parsed).")
    try:
        main(parse_args(args_cls, argv))
    except UserError as e:
        print(str(e).splitlines()[0] if str(e) else "error", file=sys.stderr)
        sys.exit(2)
    except Stopped:  # the checkpoint is written and the line printed
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:  # outside the training loop (which stops after a checkpoint): no traceback
        sys.exit(130)


def check_common_flags(args: Any, crop_multiple: int) -> None:
    """The flag checks all four scripts share, before anything is built or written."""
    if (args.eval_only or args.predict) and not args.ckpt:
        raise UserError(f"error: --{'predict' if args.predict else 'eval-only'}: no --ckpt given. Expected --ckpt "
                        "<out>/checkpoints/step_XXXXXXX (a checkpoint folder written by training).")
    for k, lo in (("iters", 1), ("log_every", 1), ("eval_every", 1), ("batch_size", 1), ("ckpt_every", 0),
                  ("profile", 0)):
        if getattr(args, k) < lo:
            raise UserError(f"error: --{k.replace('_', '-')}: got {getattr(args, k)}. Expected an integer >= {lo}.")
    for a, b in (("eval-only", "resume"), ("profile", "estimate-memory")):
        if getattr(args, a.replace("-", "_")) and getattr(args, b.replace("-", "_")):
            raise UserError(f"error: --{b}: cannot be combined with --{a}. Expected one of them.")
    if args.crop_size < crop_multiple or args.crop_size % crop_multiple:
        raise UserError(f"error: --crop-size: got {args.crop_size}. Expected a positive multiple of {crop_multiple}.")
