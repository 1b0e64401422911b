"""The ``relcache`` command: ``demo``, ``bench``, ``analyze`` and ``calibrate``.

All run offline on the shipped reference model by default. ``bench`` also takes a local diffusers pipeline
directory of any supported family (``--model PATH``: DiT, PixArt, SD3, FLUX, Wan, CogVideoX, HunyuanVideo, Latte),
``analyze`` a local ``DiTPipeline`` directory, ``calibrate`` the same as ``bench``.

This file assembles the parser and holds the entry point ``main``; each command is a module (``demo.py``,
``bench.py``, ``analyze.py``, ``calibrate.py``: its options and what it runs), over ``options.py`` (the argparse
types and the shared options) and ``reference.py`` (the shipped model as the commands load it).

Building the parser imports neither torch nor diffusers (each command imports them when it runs), so ``--help`` and
a bad option answer at once; ``tests/evaluation/test_cli_paths.py`` checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError
from . import analyze, bench, calibrate, demo
from .demo import save_grid
from .options import DEMO_GRID, PromptFile, claimed

__all__ = ["DEMO_GRID", "PromptFile", "build_parser", "main", "save_grid"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``relcache`` command."""
    parser = argparse.ArgumentParser(prog="relcache", description="Feature caching for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (demo, bench, analyze, calibrate):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``relcache`` console script."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # refused by the parser they were given to: the command's, whose usage lists its options
        before = argv[:argv.index(args.command)] if args.command in argv else []
        (parser if any(u in before for u in unknown) else args.parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "check", None) is not None:  # a command's checks across options, before torch is imported
        try:
            args.check(args)
        except ConfigError as err:
            args.parser.error(str(err))
    try:  # torch: imported once the options are known to be good (a second or more: Ctrl-C may land in it)
        from ..evaluation.provenance import command_line
        from ..evaluation.ranks import RankLostError
    except KeyboardInterrupt:
        return _interrupted(args)
    args.command_line = command_line(argv)
    try:
        out = getattr(args, "out", None) if args.command in _WRITES else None
        with claimed(Path(out)) if out is not None else contextlib.nullcontext():
            return args.func(args)
    except ConfigError as err:  # a bad combination of options: the command's usage and the reason, not a traceback
        args.parser.error(str(err))
    except RankLostError as err:  # torchrun: another rank died; one line, not a traceback of the collective
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _interrupted(args)
    except RuntimeError as err:  # torch.OutOfMemoryError (a device) is one too
        if not _out_of_memory(err):
            raise
        print(f"relcache {args.command}: out of memory ({_first_line(err)}): lower {_SIZES[args.command]}; "
              f"{_kept(args)}", file=sys.stderr)
        return 1


#: the options that size what a command holds at once, named when it runs out of memory
_SIZES = {"demo": "--samples", "bench": "--batch-size (one generation's samples) or --samples (all are kept)",
          "calibrate": "--samples", "analyze": "--samples or --steps"}


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocation refused by torch: a device's ``OutOfMemoryError`` or the CPU allocator's
    error (a plain RuntimeError). Found by review: ``--samples 1000000000`` ended in the allocator's traceback."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _first_line(err: BaseException) -> str:
    """The error's message without torch's location prefix, first line only, at most 200 characters."""
    text = str(err).split("\n", 1)[0]
    text = text.split("DefaultCPUAllocator: ", 1)[-1]
    return text if len(text) <= 200 else text[:197] + "..."


def _interrupted(args: argparse.Namespace) -> int:
    """Ctrl-C: one line saying what was kept, and the shell's exit status for SIGINT (not a traceback, found by
    review: also while torch is imported)."""
    print(f"\nrelcache {args.command}: interrupted; {_kept(args)}", file=sys.stderr)
    return 130


#: what an interrupted command leaves behind, once it has written its first file (``_WRITES``)
_KEPT = {
    "bench": "every finished generation is kept in {out}: run the same command with --resume (in place of "
             "--overwrite, if given) to continue",
    "calibrate": "every finished budget is kept in {out}/calibration.json: run the same command with --resume (in "
                 "place of --overwrite, if given) to continue",
    "demo": "nothing was written",
    "analyze": "the analysis in {out} may be incomplete (it has no run.json): run the command again",
}
#: the file in ``--out`` whose presence says a command has written something ("" for any file)
_WRITES = {"bench": "results.jsonl", "calibrate": "calibration.json", "analyze": ""}


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command kept: nothing, where it was stopped before its first file (loading the model,
    its warm-up), so the line names no file that is not there (found by review)."""
    out = getattr(args, "out", "")
    if args.command == "analyze" and (Path(out) / "run.json").is_file():  # removed as the save starts (analyze.py)
        return f"the earlier analysis in {out} is as it was (its run.json describes it)"
    if args.command in _WRITES:
        name, folder = _WRITES[args.command], Path(out)
        wrote = (folder / name).is_file() if name else folder.is_dir() and any(folder.iterdir())
        if not wrote:
            return f"nothing was written in {out} yet"
    return _KEPT[args.command].format(out=out)
