"""CFG-Cache at call level: the unconditional half of classifier-free guidance skipped and rebuilt.

The method itself (band split, rebuild, skip schedule) is ``relcache.methods.cfg_cache``; this file routes the
transformer calls (docs/spec.md, §CFG-Cache):

* CFG batched (one call whose batch is ``[cond; uncond]`` or ``[uncond; cond]``, any context name other than
  "cond"/"uncond"): a call is a CFG batch when the caller does not say it runs without guidance (the calling
  pipeline's ``do_classifier_free_guidance`` or guidance scale, ``begin_generation(..., guidance=False)``:
  ``generations.says_cfg``), its batch is even and the two halves of its ``hidden_states`` are equal, as every
  diffusers pipeline makes them (``torch.cat([latents] * 2)``); this is checked once, at a context's first call of a
  generation. (choice) A later call with another batch size (guidance stopped within the
  generation) is a plain call: no half is skipped; a call of half the batch (guidance dropped) continues the
  conditional half's module states, any other batch keeps one state for the whole batch. Anything else (guidance
  scale 1, or a batch of different latents) leaves CFG-Cache inert, exactly the config without it. At a step that
  skips the unconditional half, every tensor argument whose first dimension is the batch (top-level, or one level
  down in a dict argument; never tuples, ``img_ids`` or ``txt_ids``) is sliced to the conditional half, the
  transformer runs on it, and the full-batch output is reassembled in the original order with the rebuilt
  unconditional half.
* CFG split (contexts named "cond" and "uncond"): a skipped "uncond" call does not run the transformer; it returns
  the rebuild from the same step's "cond" output, so the "cond" call must come first (diffusers' pipelines do;
  otherwise the "uncond" call runs). The "uncond" context's module schedule is not consulted at a skipped call: the
  step is neither full nor cached there, and its module caches forecast from its own latest full step.
* Module caches stay per sample on a CFG batch: each cached module's predictor state is kept per half (the module's
  leading dimension is batch-major, so a half of the model batch is a half of its rows); a full-batch step records
  and predicts both halves, a half-batch step only the conditional one (``CFGRouting.row_groups``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ..errors import warn
from ..methods.cfg_cache import CFGCache
from ..methods.history import StaticCaches, numbers_on, row_dtype
from ..models.base import Adapter, SpatialGrid
from .cfg_io import other_outputs, sample_of, slice_batch, with_sample

if TYPE_CHECKING:
    from .context import Context

SPLIT_CONTEXTS = ("cond", "uncond")  # CFG as separate calls, named by diffusers' cache_context
Rows = slice | None  # rows of a batch; None = all of them
#: the static buffers (``StaticCaches``) of the stored (ΔLF, ΔHF), one pair per session: one delta is kept at a time
DELTA_KEYS = (("cfg", "delta", "low"), ("cfg", "delta", "high"))
#: runs the transformer for a context and counts its FLOPs
RunFn = Callable[["Context", Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


@dataclass
class CFGRouting:
    """How one context's calls relate to a CFG batch, decided at its first call of a generation."""

    is_cfg_batch: bool | None = None  # None until the first call
    rows: int = 0  # the batch size of that first call
    cond_first: bool = False
    row_group: str | None = None  # this call is not the CFG batch: its one row group ("cond" or "all")
    half_batch: bool = False  # this call runs only the conditional half of the CFG batch
    uncond_skipped: list[int] = field(default_factory=list)  # steps whose unconditional half was rebuilt
    # the rest of this call's plan, settled at its start (``CFGRunner.plan``) so that a compiled forward reads no step
    skip_call: bool = False  # a split "uncond" call answered from the same step's "cond" output
    store: bool = False  # store the delta after this call (``align``: if the step turned out full)
    weights: torch.Tensor | None = None  # the rebuild's (w1, w2), a tensor: compiled code never sees their values
    grid: SpatialGrid | None = None  # token outputs to image layout and back (``Adapter.spatial_grid``)

    def new_call(self) -> None:
        self.row_group = None
        self.half_batch = self.skip_call = self.store = False
        self.grid = None

    @property
    def batch_scale(self) -> int:
        """Full-batch rows per row that runs now: 2 at a half-batch step."""
        return 2 if self.half_batch else 1

    def group_names(self) -> list[str]:
        """The row groups of this call, in row order (``row_groups`` without the rows)."""
        if not self.is_cfg_batch:
            return ["all"]
        if self.row_group is not None:
            return [self.row_group]
        if self.half_batch:
            return ["cond"]
        return ["cond", "uncond"] if self.cond_first else ["uncond", "cond"]

    def row_groups(self, rows: int) -> list[tuple[str, Rows]]:
        """The row groups of a cached module's ``rows``-row batch that keep separate predictor states."""
        names = self.group_names()
        if len(names) == 1:
            return [(names[0], None)]
        if rows % 2:
            raise RuntimeError(f"CFG-Cache: a cached module's batch of {rows} rows does not split in two halves")
        cond, uncond = _halves(rows, self.cond_first)
        return [(name, cond if name == "cond" else uncond) for name in names]


class SplitCond(NamedTuple):
    """Split CFG: the "cond" call of a step, waiting for its "uncond" pair."""

    step: int
    shape: tuple[int, ...]  # its hidden_states' shape


class CFGState:
    """CFG-Cache memory of one generation, shared by the contexts (split CFG pairs "cond" with "uncond")."""

    def __init__(self) -> None:
        self.delta: tuple[torch.Tensor, torch.Tensor] | None = None  # (ΔLF, ΔHF) of the latest step with both
        self.delta_shape: tuple[int, ...] | None = None  # input shape of the conditional half it belongs to
        self.scale = (1.0, 1.0)  # compound mode: the weights multiplied up since the delta was stored
        self.cond: SplitCond | None = None  # the latest "cond" call (step and shape), set at its start
        self.cond_output: Any = None  # its output, set when it returns
        self.cond_progress: Any = None  # its context's ScheduleProgress: whether that step was full
        self.refreshed: int | None = None  # the step the delta was stored at (set on the host at the call's end)
        # a delta was stored in the running call: a constant set in (possibly compiled) code, where reading the step
        # would guard the graph on it (a new step count recompiled), turned into ``refreshed`` by ``settle``
        self.stored = False
        self.cond_calls = 0  # the "cond" calls planned so far
        self.uncond_step: int | None = None  # the step of the latest "uncond" call planned (skipped or not)
        self.uncond_first = 0  # steps whose "uncond" call came before their "cond" call

    def store(self, cfg: CFGCache, uncond: torch.Tensor, cond: torch.Tensor, shape: tuple[int, ...],
              grid: SpatialGrid | None = None, static: StaticCaches | None = None) -> None:
        """Keep ``(ΔLF, ΔHF)`` of the running call's step (``settle`` records which); ``grid`` puts token outputs in
        image layout first (``Adapter.spatial_grid``). ``static``: a compiled context's buffers, which the deltas are
        copied into (in a graph, a write into static inputs), so that no graph outputs a tensor kept for later steps
        (docs/spec.md, §Capture)."""
        if grid is not None:
            uncond, cond = grid[0](uncond), grid[0](cond)
        low, high = cfg.deltas(uncond, cond)
        if static is not None:
            low, high = static.put(DELTA_KEYS[0], low), static.put(DELTA_KEYS[1], high)
        self.delta = (low, high)
        self.delta_shape = shape
        self.scale = (1.0, 1.0)
        self.stored = True

    def settle(self, step: int) -> None:
        """At a call's end, on the host: a delta stored in it was stored at ``step``."""
        if self.stored:
            self.refreshed, self.stored = step, False

    @property
    def nbytes(self) -> int:
        """Bytes of the stored deltas and of a split-CFG conditional output waiting for its pair."""
        held = list(self.delta or ())
        if self.cond_output is not None:
            # its sample, whatever the container: a diffusers output dataclass or a tuple counted nothing before
            # (found by review; an output of several tensors is not kept, ``_several_outputs``)
            held.append(sample_of(self.cond_output))
        return sum(t.numel() * t.element_size() for t in held)

    def usable(self, shape: tuple[int, ...]) -> bool:
        return self.delta is not None and self.delta_shape == shape

    def weights(self, cfg: CFGCache, step: int, num_steps: int) -> tuple[float, float]:
        """The rebuild's ``(w1, w2)`` at ``step``; (choice) they apply afresh unless ``compound``."""
        w1, w2 = cfg.weights(step, num_steps)
        if cfg.compound:
            w1, w2 = self.scale = (self.scale[0] * w1, self.scale[1] * w2)
        return w1, w2

    def rebuild(self, cfg: CFGCache, cond: torch.Tensor, weights: torch.Tensor,
                grid: SpatialGrid | None = None) -> torch.Tensor:
        """The unconditional output rebuilt from ``cond``; ``weights`` holds ``(w1, w2)``."""
        w1, w2 = weights[0], weights[1]
        if grid is None:
            return cfg.rebuild(cond, *self.delta, w1, w2)
        return grid[1](cfg.rebuild(grid[0](cond), *self.delta, w1, w2))


def _step_full(ctx: Context) -> bool:
    """Whether ``ctx``'s current step is full (a step no cached module reached counts as full)."""
    return ctx.schedule.full or not ctx.schedule.decided


def _force_full(ctx: Context, decide: Callable[[], bool] | None) -> None:
    """``refresh_full``: make ``ctx``'s current step full (taking the schedule's decision first, so that the
    schedule's own full steps are counted once)."""
    progress = ctx.schedule
    if not progress.decided and decide is not None:
        decide()
    progress.decided = True
    if not progress.full:
        progress.full = True
        progress.full_steps.append(ctx.step)


def _halves(batch: int, cond_first: bool) -> tuple[slice, slice]:
    """(conditional rows, unconditional rows) of a CFG batch."""
    first, second = slice(0, batch // 2), slice(batch // 2, batch)
    return (first, second) if cond_first else (second, first)


class CFGRunner:
    """Runs the transformer calls of a generation under CFG-Cache, batched or split."""

    def __init__(self, cfg: CFGCache, adapter: Adapter, run: RunFn,
                 guidance: Callable[[], bool | None] | None = None) -> None:
        self.cfg = cfg
        self.adapter = adapter
        self.run = run
        self.guidance = guidance  # whether the caller says this call runs CFG batched (None: it says nothing)
        self.state = CFGState()
        #: the output fields besides the sample, once a call showed some: CFG-Cache is then off for good
        self.other_outputs: list[str] = []
        self._warned_order = False  # a loop calling "uncond" before "cond" was warned of (once per enable)
        self._warned_late = False  # guidance starting part-way (CFG-Cache then off) was warned of (once per enable)

    def reset(self) -> None:
        """Forget the stored deltas (a new generation, or the end of one)."""
        self.state = CFGState()

    def plan(self, ctx: Context, num_steps: int | None, args: tuple[Any, ...], kwargs: dict[str, Any],
             decide: Callable[[], bool] | None = None) -> None:
        """Settle this call's routing at its start, on the host: whether it is the CFG batch, which half runs, whether
        it stores a delta, the rebuild's weights. Steps are read here only, never in the (possibly compiled) call.
        ``decide()`` takes the step's decision now (``align`` asks for it only where it matters: a step inside
        the window, with a usable delta and no refresh due); None when the step was decided already."""
        cfg, routing, state, step = self.cfg, ctx.cfg, self.state, ctx.step
        if self.other_outputs and ctx.name in SPLIT_CONTEXTS:  # (choice) off for good: the method alone
            return
        if cfg.align and not cfg.skip_full:  # it skips and stores nothing: the method alone, without detection's reads
            if num_steps is not None:
                cfg.window_range(num_steps)  # a window that does not fit is still an error
            return
        shape = tuple(self.adapter.hidden_of(args, kwargs).shape)
        if ctx.name in SPLIT_CONTEXTS:
            if ctx.name == "cond":
                state.cond, state.cond_output = SplitCond(step, shape), None
                state.cond_progress = ctx.schedule
                state.cond_calls += 1
                # its "uncond" pair will run too, unless the previous step had none (guidance off, or stopped
                # part-way: only "cond" calls, and no delta would ever make a step skippable)
                paired = state.cond_calls == 1 or state.uncond_step is not None and state.uncond_step >= step - 1
                if cfg.refresh_full and paired and not (cfg.skips(step, num_steps) and state.usable(shape)):
                    _force_full(ctx, decide)
                return
            state.uncond_step = step
            paired = state.cond is not None and state.cond == (step, shape) and state.cond_output is not None
            if not paired and state.cond is not None and state.cond.step == step - 1:
                self._check_order(state)
            inside = step in cfg.window_range(num_steps)
            if cfg.align:  # the "cond" call of this step has run: its decision is known
                cond = state.cond_progress
                cond_full = cond is not None and (cond.full or not cond.decided)
                routing.skip_call = (cfg.skip_full and paired and inside and state.usable(shape) and cond_full
                                     and not cfg.refresh_due(step, state.refreshed, num_steps))
                # a true delta needs both calls full: the "uncond" context's own full step (``_stores``) and the
                # "cond" call's (found by review: with RCS deciding each context apart, deltas were taken from a
                # forecast "cond" output)
                routing.store = cfg.skip_full and paired and not routing.skip_call and inside and cond_full
            else:
                routing.skip_call = paired and cfg.skips(step, num_steps) and state.usable(shape)
                routing.store = paired and not routing.skip_call and cfg.stores(step, num_steps)
            if cfg.refresh_full and not routing.skip_call:
                _force_full(ctx, decide)
        else:
            if not self._is_cfg_batch(ctx, num_steps, args, kwargs):
                return
            batch = shape[0]
            if batch != routing.rows:  # (choice) guidance stopped or changed within the generation: a plain call
                # half the batch: guidance dropped the unconditional half, so the conditional half's states continue
                routing.row_group = "cond" if 2 * batch == routing.rows else "all"
                return
            if self.other_outputs:  # (choice) off for good: the method with a state per half, as at the first call
                return  # that found the other outputs (its modules had recorded per half), skipping nothing
            usable = state.usable((batch // 2, *shape[1:]))
            inside = step in cfg.window_range(num_steps)
            if cfg.align:  # skip_full: skip at a full step with no refresh due; a cached step forecasts both halves
                if cfg.skip_full and inside and usable and not cfg.refresh_due(step, state.refreshed, num_steps):
                    full = ctx.schedule.full if ctx.schedule.decided or decide is None else decide()
                    routing.half_batch = full
                routing.store = cfg.skip_full and not routing.half_batch and inside
            else:
                routing.half_batch = cfg.skips(step, num_steps) and usable
                routing.store = not routing.half_batch and cfg.stores(step, num_steps)
            if cfg.refresh_full and not routing.half_batch:
                _force_full(ctx, decide)
        if routing.half_batch or routing.skip_call:
            like = self.adapter.hidden_of(args, kwargs)
            weights, dtype = list(state.weights(cfg, step, num_steps)), row_dtype(like.dtype)
            routing.weights = (numbers_on(weights, like.device, dtype) if ctx.static is None else
                               ctx.static.put_numbers((ctx.name, "cfg weights"), weights, like.device, dtype))
            routing.uncond_skipped.append(step)
        if routing.half_batch or routing.skip_call or routing.store:
            routing.grid = self.adapter.spatial_grid(args, kwargs)

    def _is_cfg_batch(self, ctx: Context, num_steps: int | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether the context's calls are a CFG batch, decided at its first call: not when the caller says it runs
        no CFG (the pipeline's ``do_classifier_free_guidance`` or guidance scale, ``begin_generation(...,
        guidance=False)``), else when the batch is even and its halves' latents are equal."""
        routing = ctx.cfg
        if routing.is_cfg_batch is None:
            hidden = self.adapter.hidden_of(args, kwargs)
            batch, half = hidden.shape[0], hidden.shape[0] // 2
            said = self.guidance() if self.guidance is not None else None
            routing.is_cfg_batch = (said is not False and batch % 2 == 0 and batch > 0
                                    and torch.equal(hidden[:half], hidden[half:]))
            routing.rows = batch
            routing.cond_first = self.cfg.cond_first if self.cfg.cond_first is not None else self.adapter.cfg_cond_first
            if routing.is_cfg_batch and not self.other_outputs:  # off for good: no window to fit (as split CFG)
                self.cfg.window_range(num_steps)  # validate the window against the number of steps now
        elif not routing.is_cfg_batch and not self._warned_late:
            batch = self.adapter.hidden_of(args, kwargs).shape[0]
            if batch == 2 * routing.rows:  # the batch doubled: guidance turned on part-way (a shape, no tensor read)
                self._warned_late = True
                warn(f"relcache: this generation's first call was not a CFG batch ({routing.rows} rows) and a later "
                     f"one has twice the rows ({batch}): guidance that starts part-way leaves CFG-Cache off for the "
                     "whole generation (it is decided at a context's first call; docs/spec.md, §CFG-Cache). Said "
                     "once per enable.", RuntimeWarning)
        return routing.is_cfg_batch

    def forward_args(self, ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any],
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments this call's forward gets: the conditional half's at a half-batch step, else all."""
        if not ctx.cfg.half_batch:
            return args, kwargs
        batch = self.adapter.hidden_of(args, kwargs).shape[0]
        return slice_batch(args, kwargs, batch, _halves(batch, ctx.cfg.cond_first)[0], self.adapter.batch_axes)

    def call(self, ctx: Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run this call as ``plan`` settled it."""
        if ctx.name in SPLIT_CONTEXTS:
            return self._split(ctx, forward, args, kwargs)
        return self._batched(ctx, forward, args, kwargs)

    def _batched(self, ctx: Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        routing = ctx.cfg
        if not routing.is_cfg_batch or routing.row_group is not None:
            return self.run(ctx, forward, args, kwargs)
        hidden = self.adapter.hidden_of(args, kwargs)
        batch = hidden.shape[0]
        cond_rows, uncond_rows = _halves(batch, routing.cond_first)
        if routing.half_batch:
            out = self.run(ctx, forward, *self.forward_args(ctx, args, kwargs))
            cond = sample_of(out)
            uncond = self.state.rebuild(self.cfg, cond, routing.weights, routing.grid)
            return with_sample(out, torch.cat([cond, uncond] if routing.cond_first else [uncond, cond]))
        out = self.run(ctx, forward, args, kwargs)
        if self._several_outputs(out):
            return out
        self._reserve(ctx, lambda: sample_of(out)[cond_rows], args, kwargs)
        if self._stores(ctx):  # only a step inside the window can use the delta
            sample = sample_of(out)
            half_shape = (batch // 2, *hidden.shape[1:])
            self.state.store(self.cfg, sample[uncond_rows], sample[cond_rows], half_shape, routing.grid, ctx.static)
        return out

    def _reserve(self, ctx: Context, half: Callable[[], torch.Tensor], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        """A compiled context's (``ctx.static``) delta buffers, reserved at an eager call (where buffers can be made)
        for deltas of a half output like ``half()``: a later store, compiled, then writes into them in place. Their
        shape comes from the band split run on the meta device (no FFT is computed)."""
        if ctx.static is None or torch.compiler.is_compiling():
            return
        real = half()
        grid = ctx.cfg.grid if ctx.cfg.grid is not None else self.adapter.spatial_grid(args, kwargs)
        like = torch.empty_like(real, device="meta")
        if grid is not None:
            like = grid[0](like)
        for key, delta in zip(DELTA_KEYS, self.cfg.deltas(like, like), strict=True):
            ctx.static.reserve(key, delta, device=real.device)

    def _several_outputs(self, out: Any) -> bool:
        """Whether ``out`` has fields besides the sample. The first one seen turns CFG-Cache off for good, with a
        warning: it rebuilds the sample's unconditional half only, so the other fields' would be missing (batched
        CFG) or the conditional call's (split CFG). Checked at eager calls: a context's first call runs eagerly."""
        if not self.other_outputs and not torch.compiler.is_compiling():
            self.other_outputs = other_outputs(out)
            if self.other_outputs:
                warn(f"relcache: CFG-Cache is off for this model: its output holds {self.other_outputs} besides "
                     "the sample, and CFG-Cache rebuilds only the sample's unconditional half. No call is skipped from "
                     "now on: every call runs the method, each CFG half with a state of its own.")
        return len(self.other_outputs) > 0

    def _check_order(self, state: CFGState) -> None:
        """A step's "uncond" call came before its "cond" call: CFG-Cache pairs "uncond" with the "cond" call made
        before it in the step, so it skips nothing. Said once per enable, at the second such step (found by review:
        FasterCache, whose refresh_full forces every step that runs both calls full, silently became full
        computation)."""
        state.uncond_first += 1
        if state.uncond_first < 2 or self._warned_order:
            return
        self._warned_order = True
        forced = ", and its refresh_full (FasterCache's) makes every step full" if self.cfg.refresh_full else ""
        warn('relcache: this loop calls the transformer in context "uncond" before "cond" at each step, so CFG-Cache, '
             f'which answers a step\'s "uncond" call from the "cond" call made before it, skips nothing{forced}: '
             'call "cond" first, then "uncond". Said once per enable.', RuntimeWarning)

    def _stores(self, ctx: Context) -> bool:
        """After a call that may store: whether it does (``align``: only a full step's outputs, true ones)."""
        return ctx.cfg.store and (not self.cfg.align or _step_full(ctx))

    def _split(self, ctx: Context, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        routing, state = ctx.cfg, self.state
        if ctx.name == "cond":
            out = self.run(ctx, forward, args, kwargs)
            state.cond_output = None if self._several_outputs(out) else out
            return out
        if routing.skip_call:  # its FLOPs are counted at the call's end (StepCalls.end_call)
            return with_sample(state.cond_output, state.rebuild(self.cfg, sample_of(state.cond_output),
                                                                routing.weights, routing.grid))
        out = self.run(ctx, forward, args, kwargs)
        self._reserve(ctx, lambda: sample_of(out), args, kwargs)
        if self._stores(ctx):
            shape = tuple(self.adapter.hidden_of(args, kwargs).shape)
            state.store(self.cfg, sample_of(out), sample_of(state.cond_output), shape, routing.grid, ctx.static)
        return out
