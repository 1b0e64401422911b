"""The stats caching reports: ``ContextStats`` per call context, ``CacheStats`` for a generation, and how the
contexts' numbers combine (FLOPs pooled, not their fractions averaged). The FLOPs themselves are counted in
``accounting.py``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_NAN = float("nan")

#: the FLOP fields of ``ContextStats`` when FLOPs are unknown
UNKNOWN_FLOPS = {name: _NAN for name in ("flops_fraction", "executed_flops", "full_flops", "model_flops_fraction",
                                         "model_executed_flops", "model_full_flops")}


def fraction(num: float, den: float) -> float:
    """``num / den``, NaN when nothing was counted."""
    return num / den if den > 0 else _NAN


@dataclass(frozen=True)
class ContextStats:
    """What one call context (e.g. "cond" or "uncond") did in the last generation."""

    name: str
    num_steps: int
    full_steps: list[int]
    nfc: int
    flops_fraction: float
    executed_flops: float  # FLOPs of the cached modules that actually ran
    full_flops: float  # FLOPs those modules would have run with full computation
    input_errors: dict[int, float] = field(default_factory=dict)  # RCS e(i), InputError schedules only
    module_errors: dict[str, dict[int, float]] = field(default_factory=dict)  # record_errors=True only
    uncond_skipped_steps: list[int] = field(default_factory=list)  # CFG-Cache: steps without the uncond half
    model_flops_fraction: float = _NAN  # whole transformer: executed / full computation
    model_executed_flops: float = 0.0
    model_full_flops: float = 0.0
    cache_bytes: int = 0  # bytes the predictors and the schedule hold at the end of the generation
    nonfinite_samples: dict[int, int] = field(default_factory=dict)  # RCS: step -> samples whose error was not finite
    flops_unknown: str | None = None  # why the FLOP fields are NaN (counting off or failed); None when counted
    peak_cache_bytes: int = 0  # the most they held at the end of a call
    peak_module_bytes: dict[str, int] = field(default_factory=dict)  # per cached module, at that peak
    cache_storage: str = ""  # how the caches held tensors (``CacheStorage.label``)

    @property
    def uncond_skipped(self) -> int:
        """How many unconditional halves (or "uncond" calls) CFG-Cache skipped."""
        return len(self.uncond_skipped_steps)


@dataclass(frozen=True)
class CacheStats:
    """What caching did in the last generation.

    With one context (CFG batched, or no CFG) the top-level fields are that context's. With several
    (CFG split into calls), ``full_steps`` is the union of their full steps, ``nfc`` its length,
    ``num_steps`` the largest, and ``flops_fraction`` pools the FLOPs of all contexts.

    ``flops_fraction`` covers the cached modules, ``model_flops_fraction`` the whole transformer (the modules that
    are never cached, embeddings and final layer included); a step that ran half the batch counts half.
    ``uncond_skipped`` counts the unconditional halves CFG-Cache skipped, over all contexts.
    ``cache_bytes`` is the memory the caches hold when the stats are read (predictor states, RCS input history and
    CFG-Cache deltas, over all contexts): 0 after a pipeline call, which frees them. ``modules`` maps each cached
    module's name to its kind (``"attn"``, ``"cross_attn"`` or ``"mlp"``), in execution order.
    ``peak_cache_bytes`` is the most the caches held at the end of a call (a generation's caches are freed at its
    end, so ``cache_bytes`` then reads 0), the sum of the contexts' peaks; ``peak_cache_bytes_by_kind`` splits the
    predictor states' part of it by module kind. ``buffer_bytes`` is what relcache keeps between generations beside
    them: the buffers at stable addresses of compiled or captured steps (docs/spec.md, §Capture), which hold about a
    generation's caches after a compiled call, where ``cache_bytes`` reads 0, and batch modulation's tables (every
    step's adaLN projections, kept to be refilled in place); ``disable`` frees them (found by review: nothing
    reported them).

    ``nonfinite_samples`` is the most samples whose RCS input error was NaN or infinite at one step (0: none; those
    samples are left out of the step's decision, see ``InputError``); each context's ``nonfinite_samples`` says at
    which steps. ``flops_unknown`` says why the FLOP fields are NaN: counting was turned off
    (``enable(..., count_flops=False)``) or failed on this model (the reason); None when FLOPs were counted.

    ``experts``: on a pipeline whose generation runs several transformers (Wan 2.2), each one's stats over the steps
    it served, by attribute name (``"transformer"``, ``"transformer_2"``); the top-level fields are the total. Empty
    for one transformer.
    """

    method: str
    nfc: int
    num_steps: int
    full_steps: list[int]
    flops_fraction: float
    contexts: dict[str, ContextStats]
    model_flops_fraction: float = _NAN
    uncond_skipped: int = 0
    cache_bytes: int = 0
    modules: dict[str, str] = field(default_factory=dict)
    nonfinite_samples: int = 0
    flops_unknown: str | None = None
    peak_cache_bytes: int = 0
    peak_cache_bytes_by_kind: dict[str, int] = field(default_factory=dict)
    experts: dict[str, CacheStats] = field(default_factory=dict)
    buffer_bytes: int = 0

    def __str__(self) -> str:
        """A few lines for ``print(stats)``: the budget, the full steps, FLOPs and memory (``repr`` holds every
        field, per-step errors included)."""
        lines = [f"{self.method}: NFC {self.nfc} of {self.num_steps} steps, full at {self.full_steps}"]
        if self.flops_unknown is None:
            lines.append(f"  FLOPs: {self.flops_fraction:.1%} of full computation in the cached modules, "
                         f"{self.model_flops_fraction:.1%} in the whole transformer")
        else:
            lines.append(f"  FLOPs: unknown ({self.flops_unknown})")
        storage = sorted({c.cache_storage for c in self.contexts.values() if c.cache_storage})
        lines.append(f"  caches: peak {self.peak_cache_bytes / 2**20:.1f} MiB"
                     + (f", held {', '.join(storage)}" if storage else "") + f", {len(self.modules)} cached modules"
                     + (f"; {self.buffer_bytes / 2**20:.1f} MiB kept between generations" if self.buffer_bytes
                        else ""))
        if self.uncond_skipped:
            lines.append(f"  CFG-Cache: {self.uncond_skipped} unconditional halves skipped")
        if self.nonfinite_samples:
            lines.append(f"  RCS: up to {self.nonfinite_samples} samples with a non-finite input error at a step")
        if len(self.contexts) > 1:
            lines += [f"  context {c.name!r}: NFC {c.nfc} of {c.num_steps}, full at {c.full_steps}"
                      for c in self.contexts.values()]
        lines += [f"  expert {name!r}: NFC {e.nfc} of {e.num_steps}" for name, e in self.experts.items()]
        return "\n".join(lines)

    @property
    def nfc_per_context(self) -> int:
        """The most full steps one call context ran: what a ``target_nfc`` budget names, since each context (a CFG
        half run as a call of its own) keeps its own budget. ``nfc`` counts the step indices full in any context,
        which exceeds the budget where the contexts choose different steps."""
        return max((c.nfc for c in self.contexts.values()), default=self.nfc)


def combine(method: str, per: dict[str, ContextStats], shared_bytes: int, modules: dict[str, str],
            flops_unknown: str | None = None) -> CacheStats:
    """The generation's stats from its contexts'; ``shared_bytes`` is what the contexts hold together."""
    nonfinite = max((n for c in per.values() for n in c.nonfinite_samples.values()), default=0)
    if len(per) == 1:
        only = next(iter(per.values()))
        return CacheStats(method, only.nfc, only.num_steps, only.full_steps, only.flops_fraction, per,
                          only.model_flops_fraction, only.uncond_skipped, only.cache_bytes + shared_bytes, modules,
                          nonfinite, flops_unknown)
    steps = sorted({s for c in per.values() for s in c.full_steps})
    flops = fraction(sum(c.executed_flops for c in per.values()), sum(c.full_flops for c in per.values()))
    model = fraction(sum(c.model_executed_flops for c in per.values()), sum(c.model_full_flops for c in per.values()))
    num_steps = max((c.num_steps for c in per.values()), default=0)
    skipped = sum(c.uncond_skipped for c in per.values())
    held = sum(c.cache_bytes for c in per.values()) + shared_bytes
    return CacheStats(method, len(steps), num_steps, steps, flops, per, model, skipped, held, modules, nonfinite,
                      flops_unknown)


def with_peaks(stats: CacheStats) -> CacheStats:
    """``stats`` with its cache-memory peaks: the sum of the contexts' peaks, and their modules' bytes by kind."""
    by_kind: dict[str, int] = {}
    for c in stats.contexts.values():
        for name, n in c.peak_module_bytes.items():
            kind = stats.modules.get(name, "?")
            by_kind[kind] = by_kind.get(kind, 0) + n
    peak = sum(c.peak_cache_bytes for c in stats.contexts.values())
    return dataclasses.replace(stats, peak_cache_bytes=peak, peak_cache_bytes_by_kind=by_kind)
