"""The ``relcache`` command's argparse types (each checks its value before any work and names what is wrong) and the
options ``bench``, ``analyze`` and ``calibrate`` share."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..evaluation.budgets import INTERVAL_FOR_NFC
from ..evaluation.pipelines import DEFAULT_PROMPTS

#: the demo grid's file name, also used inside a directory given as ``demo --out``
DEMO_GRID = "relcache-demo.png"


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``."""

    def parse(value: str) -> int:
        n = int(value)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return n

    parse.__name__ = f"integer >= {low}"  # argparse names the type in its error for a non-integer
    return parse


_positive, _index = _int_at_least(1), _int_at_least(0)

#: the most sampling steps a command takes: the schedulers' training steps (the reference DDIM's 1000), past which
#: diffusers refuses ``set_timesteps`` only after the model has loaded (found by review)
MAX_STEPS = 1000


def _steps(value: str) -> int:
    """An argparse type: a number of sampling steps, an integer in 2 .. ``MAX_STEPS``."""
    n = int(value)
    if not 2 <= n <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be an integer in 2..{MAX_STEPS} (the schedulers' training steps), "
                                         f"got {value}")
    return n


_steps.__name__ = f"integer in 2..{MAX_STEPS}"


@contextlib.contextmanager
def claimed(directory: Path) -> Iterator[None]:
    """Hold ``directory`` (created if missing) for one command: a second ``relcache`` command writing into it while
    this one runs is refused (``ConfigError``) before it loads anything. Two runs into one ``--out`` were both
    accepted and mixed their records, and a later ``--resume`` read one run's samples as the other's (found by
    review). An exclusive ``flock`` on the directory itself, released when the command ends (or its process dies);
    under torchrun the first rank alone holds it (the ranks share the directory). A directory made here and left
    empty is removed again. (Where ``fcntl`` is missing, Windows, nothing is held.)"""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"--out {directory} is in use by another relcache command still writing into it: "
                              "wait for it to end, or choose another --out") from None
        yield
    finally:
        os.close(fd)  # (the lock goes with it)
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty


def _integer(value: str) -> int:
    """An argparse type: any integer, for options whose range depends on another option (checked after parsing)."""
    return int(value)


_integer.__name__ = "integer"


def _check_resume(args: argparse.Namespace) -> None:
    """``--resume`` and ``--overwrite`` rule each other out (bench, calibrate)."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


def _seed(value: str) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in 0 .. 2**63 - 1 (batches are seeded ``seed + b``)."""
    n = int(value)
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{2**63 - 1}, got {value}")
    return n


_seed.__name__ = "integer seed"


def _guidance(value: str) -> float:
    x = float(value)
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1 or less: no guidance), got {value}")
    return x


def _dit_pipeline_dir(value: str) -> str:
    """A local diffusers DiTPipeline directory (``analyze``): checked here, so a wrong path fails at once (and never
    reaches the Hub, which ``from_pretrained`` would ask about a name such as ``nosuch/model``)."""
    path = Path(value).expanduser()
    need = "must be a local diffusers DiTPipeline directory (with a model_index.json)"
    if not path.is_dir():
        reason = "is not a directory" if path.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"{need}; {value} {reason}")
    index = path / "model_index.json"
    if not index.is_file():
        raise argparse.ArgumentTypeError(f"{need}; {value} has no model_index.json")
    try:
        pipeline_class = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise argparse.ArgumentTypeError(f"{need}; cannot read {index}: {err}") from None
    if pipeline_class != "DiTPipeline":
        raise argparse.ArgumentTypeError(f"{need}; {value} holds a {pipeline_class}")
    return str(path)


def _pipeline_dir(value: str) -> str:
    """A local diffusers pipeline directory of a supported family (``bench``), recognised from its model_index.json
    alone, before anything is loaded."""
    from ..evaluation.pipelines import FAMILY_NAMES, inspect_dir

    try:
        inspect_dir(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a local diffusers pipeline directory of a supported family "
                                         f"({FAMILY_NAMES}) with a model_index.json; {err}") from None
    return str(Path(value).expanduser())


@dataclass(frozen=True)
class PromptFile:
    """``--prompts FILE``: where the prompts came from (recorded with the run) and the prompts."""

    path: str
    prompts: list[str]


def _prompts_file(value: str) -> PromptFile:
    from ..evaluation.pipelines import read_prompts

    try:
        return PromptFile(str(Path(value).expanduser().resolve()), read_prompts(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be a text file with one prompt a line; {err}") from None


def _size(value: str) -> int:
    n = int(value)
    if n < 8 or n % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (pixels), got {value}")
    return n


def _unwritable(directory: Path) -> str | None:
    """Why files cannot be written in ``directory`` (created with its parents if missing), or None if they can.

    Checked before any work, so a bad output location does not lose a finished run. Nothing is created: the nearest
    existing ancestor must be a directory a file can be created in (tried with a temporary file, which also tells
    root the truth about read-only file systems)."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"cannot write in {existing}: {err.strerror or err}"
    return None


def _output_dir(value: str) -> Path:
    path = Path(value).expanduser()
    reason = _unwritable(path)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the results in {value}: {reason}")
    return path


def _output_png(value: str) -> Path:
    """The grid's file: ``value`` itself if it ends in .png, ``value`` + .png without a suffix, or
    ``relcache-demo.png`` inside ``value`` when it is a directory (or ends with a slash)."""
    path = Path(value).expanduser()
    if value.endswith(("/", os.sep)) or path.is_dir():
        path = path / DEMO_GRID
    elif not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the grid is a PNG: name a .png file or a directory, got {value}")
    reason = _unwritable(path.parent)
    if reason is not None:
        raise argparse.ArgumentTypeError(f"cannot write the grid {path}: {reason}")
    return path


def _budget(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n not in INTERVAL_FOR_NFC:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(INTERVAL_FOR_NFC)} (NFC of 50 steps), got {value}")
    return n


def _add_generation_options(p: argparse.ArgumentParser, *, samples: int, samples_help: str, steps_help: str,
                            guidance: float | None = 1.5) -> None:
    """The options ``bench`` and ``analyze`` share: samples, DDIM steps, CFG scale, order and seed."""
    p.add_argument("--samples", type=_positive, default=samples, help=f"{samples_help} (default: %(default)s)")
    p.add_argument("--steps", type=_steps, default=50, help=f"{steps_help}, 2..{MAX_STEPS} (default: %(default)s)")
    p.add_argument("--guidance", type=_guidance, default=guidance,
                   help="guidance scale, >= 0 (default: 1.5 on the reference model and DiT, else the pipeline's own)"
                   if guidance is None else "CFG scale, >= 0 (default: %(default)s)")
    p.add_argument("--order", type=int, default=2, choices=range(1, 5), help="Taylor/RFE order (default: 2)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")


def _pipeline_inputs(args: argparse.Namespace) -> tuple[Any, list[int], dict[str, Any]]:
    """(family or None for the reference model, the conditions cycled over, the settings they add) of ``bench``'s and
    ``calibrate``'s model options: every combination checked before anything is loaded."""
    from ..evaluation.pipelines import DEFAULT_PROMPTS, check_frames, inspect_dir, num_classes, size_multiple

    family = inspect_dir(args.model)[1] if args.model else None
    name = family.name if family else "the reference model"
    if args.peers and family is not None and family.name != "dit":
        raise ConfigError(f"--peers runs on the reference model and DiT pipelines, not on {family.name}")
    if family is None:
        for option in ("height", "width", "frames"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} is for --model pipelines; the reference model makes 16x16 digits")
    else:
        for option in ("height", "width"):
            if getattr(args, option) is not None and not family.sized:
                raise ConfigError(f"--{option} is not taken by {family.name} pipelines, which make images of their "
                                  "transformer's sample size")
            multiple, why = size_multiple(args.model, family)
            value = getattr(args, option)
            if value is not None and value % multiple:  # found by review: refused only once the pipeline had loaded
                raise ConfigError(f"argument --{option}: must be a multiple of {multiple} for this {family.name} "
                                  f"pipeline ({why}), got {value}")
        try:
            check_frames(family, args.frames)
        except ValueError as err:
            raise ConfigError(f"argument --frames: {err}") from None
    extra: dict[str, Any] = {"model": str(Path(args.model).resolve()) if args.model else "reference",
                             "family": family.name if family else "reference"}
    if family is not None and family.text:
        if args.labels is not None:
            raise ConfigError(f"--labels is for class-conditional models; {name} takes --prompts FILE")
        prompts = args.prompts.prompts if args.prompts else list(DEFAULT_PROMPTS)
        conditions = list(range(len(prompts)))
        extra["prompts"] = {"source": args.prompts.path if args.prompts else "built-in", "count": len(prompts),
                            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    else:
        if args.prompts is not None:
            raise ConfigError(f"--prompts is for text-conditioned models; {name} takes --labels")
        classes = num_classes(args.model) if args.model else 10
        conditions = args.labels if args.labels is not None else list(range(classes or 1000))
        bad = [c for c in conditions if classes is not None and not 0 <= c < classes]
        if bad:
            raise ConfigError(f"argument --labels: must be classes in 0..{classes - 1}, got {' '.join(map(str, bad))}")
    extra.update(frames=args.frames, height=args.height, width=args.width)
    return family, conditions, extra


def _pipeline_guidance(args: argparse.Namespace, family: Any) -> float | None:
    if args.guidance is not None:
        return args.guidance
    return 1.5 if family is None else family.default_guidance


def _add_condition_options(p: argparse.ArgumentParser) -> None:
    """What ``bench`` and ``calibrate`` generate: class labels or prompts, frames and size (``_pipeline_inputs``)."""
    p.add_argument("--labels", type=_index, nargs="+",
                   help="class labels cycled over the samples, class-conditional models only (default: every class)")
    p.add_argument("--prompts", type=_prompts_file, metavar="FILE",
                   help="prompts cycled over the samples, one a line, text-conditioned models only (default: a "
                   f"built-in list of {len(DEFAULT_PROMPTS)} varied prompts)")
    p.add_argument("--frames", type=int, help="frames per video, video models only (default: the pipeline's own)")
    p.add_argument("--height", type=_size, help="image height in pixels (default: the pipeline's own)")
    p.add_argument("--width", type=_size, help="image width in pixels (default: the pipeline's own)")
