"""Collectives per transformer call and bytes moved, per method, under diffusers' context parallelism: a benchmark.

Runs one generation per method of the tests' tiny FLUX and Wan (``tests/families.py``, random weights) on ``--world``
gloo processes of this machine (Ulysses degree ``--world``), and counts, on rank 0, relcache's collectives (every
``torch.distributed.all_reduce``: relcache makes no other kind) and, for scale, the model's own (diffusers' Ulysses
all-to-alls and output all-gathers). Bytes are each collective's input buffer on one process. Counts, not timings:
they do not depend on the machine's load. A call is one transformer call (Wan's CFG makes two per step).

    python benchmarks/collectives.py --steps 50 --out benchmarks/results/collectives.txt
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the tests' tiny models
import families  # noqa: E402

import relcache  # noqa: E402
from relcache import CacheConfig, InputError, Interval, Relational, Reuse  # noqa: E402


def methods(steps: int) -> dict[str, CacheConfig | None]:
    nfc = max(2, round(steps * 14 / 50))  # the paper's NFC 14 of 50 steps
    return {
        "plain model": None,
        "FORA(N=4)": relcache.FORA(interval=4),
        "TaylorSeer(N=4)": relcache.TaylorSeer(interval=4),
        "RFE x Interval(4)": CacheConfig(Relational(2), Interval(4)),
        f"RCS(NFC={nfc}) x Reuse": CacheConfig(Reuse(), InputError(target_nfc=nfc)),
        f"RFC(NFC={nfc})": relcache.RFC(target_nfc=nfc),
        "RFC(tau=0.3)": relcache.RFC(threshold=0.3),
        "FasterCache": relcache.FasterCache(warmup=max(2, round(0.32 * steps))),
    }


class Counter:
    """Counts the collectives made through the wrapped functions, and their bytes."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.transformer_calls = 0

    def wrap(self, owner: Any, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def counted(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls[kind] += 1
            if isinstance(tensor, torch.Tensor):
                self.bytes[kind] += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        setattr(owner, name, counted)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.transformer_calls = 0


def _worker(rank: int, world: int, port: int, steps: int, names: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count: 0 devices on a CPU machine
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from diffusers import ContextParallelConfig

    counter = Counter()
    counter.wrap(dist, "all_reduce", "relcache")
    counter.wrap(funcol, "all_to_all_single", "model")
    counter.wrap(funcol, "all_gather_tensor", "model")
    lines = []
    for family in names:
        case = families.CASES[family]
        pipe = case.build()
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        pipe.transformer.register_forward_pre_hook(lambda *_: setattr(counter, "transformer_calls",
                                                                      counter.transformer_calls + 1))
        for name, config in methods(steps).items():
            if config is not None:
                relcache.enable(pipe, config)
            counter.reset()
            pipe(**case.kwargs(), num_inference_steps=steps, generator=torch.manual_seed(0), output_type="latent")
            nfc = relcache.stats(pipe).nfc if config is not None else steps
            if config is not None:
                relcache.disable(pipe)
            calls = counter.transformer_calls
            lines.append(
                f"| {family} | {name} | {nfc} | {counter.calls['relcache'] / calls:.2f} | "
                f"{counter.bytes['relcache'] / calls:.0f} | {counter.calls['model'] / calls:.2f} | "
                f"{counter.bytes['model'] / calls:.0f} |"
            )
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--families", nargs="+", default=["flux", "wan"], choices=["flux", "wan"])
    parser.add_argument("--out", default=None, help="also write the table here")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = Path(f"/tmp/relcache_collectives_{os.getpid()}.txt")
    mp.start_processes(_worker, args=(args.world, port, args.steps, args.families, str(rows)), nprocs=args.world,
                       start_method="fork")
    header = (
        f"Collectives per transformer call on rank 0 of {args.world} gloo processes (Ulysses {args.world}), "
        f"{args.steps} steps, tiny random FLUX and Wan (tests/families.py); {datetime.date.today()}, "
        f"{platform.machine()}, torch {torch.__version__}.\n"
        "relcache: its all-reduces (float64); model: diffusers' all-to-alls and all-gathers. Bytes: one process's "
        "input buffers.\n\n"
        "| family | method | NFC | relcache collectives / call | relcache bytes / call | model collectives / call "
        "| model bytes / call |\n|---|---|---|---|---|---|---|\n"
    )
    table = header + rows.read_text()
    rows.unlink()
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
