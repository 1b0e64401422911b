"""The processes of a data-parallel ``relcache bench`` under ``torchrun``: starting the group, gathering the results,
and stopping every rank with one clear error when another died (docs/distributed.md)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

#: one generation's (samples, seconds, NFC, FLOPs), per method label and batch index
PerBatch = dict[str, dict[int, tuple[torch.Tensor, float, float, float]]]
V = TypeVar("V")

#: how long a rank waits for the others at a collective before it stops (seconds; RELCACHE_DIST_TIMEOUT overrides)
DIST_TIMEOUT_S = 600.0


class RankLostError(RuntimeError):
    """Another process of a torchrun bench stopped (or hung): this one stops instead of waiting forever."""


def _timeout() -> float:
    raw = os.environ.get("RELCACHE_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DIST_TIMEOUT_S
    except ValueError:
        raise RankLostError(f"RELCACHE_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else DIST_TIMEOUT_S


def start() -> tuple[int, int]:
    """(rank, world size); initialises gloo when launched by torchrun and not yet initialised, with a collective
    timeout (``RELCACHE_DIST_TIMEOUT``, default 600 s) so that a rank that died stops the others."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=_timeout()))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather(local: dict[str, dict[int, V]], world: int) -> dict[str, dict[int, V]]:
    """Every rank's values per method label and batch (``PerBatch``: its generations), merged (data-parallel bench
    under torchrun)."""
    if world == 1:
        return local
    gathered: list[Any] = [None] * world
    together("gathering the results", torch.distributed.all_gather_object, gathered, local)
    merged: dict[str, dict[int, V]] = {label: {} for label in local}
    for part in gathered:
        for label, per_batch in part.items():
            merged[label].update(per_batch)
    return merged


def together(what: str, collective: Callable[..., Any], *args: Any) -> Any:
    """Run a collective of the data-parallel bench; a peer that died (a closed connection) or hung (the timeout)
    becomes one clear error on this rank instead of a wait without end. Finished generations are in results.jsonl
    already, so ``--resume`` continues the run."""
    try:
        return collective(*args)
    except (RuntimeError, ConnectionError) as err:  # gloo raises RuntimeError (DistBackendError) for both
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RankLostError(
            f"relcache bench: rank {rank} stopped while {what}: another rank died or stopped answering ({first}). "
            "What finished is recorded in the output directory: rerun with --resume to continue."
        ) from err
