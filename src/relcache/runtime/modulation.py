"""Batched modulation: every step's adaLN projections of a generation computed in one product per block.

A DiT-style block turns the step's conditioning (timestep, class or pooled text) into its gates, shifts and scales
with a projection (DiT-B/2: 768 -> 4608) at every step, cached or not. At small batch each is a matrix-vector
product that reads the whole weight: on a CPU they were 56-70 % of a cached step (docs/performance.md). Their input
depends only on the step's timestep and on conditioning that is fixed for the generation, so when the timesteps are
known up front (a pipeline's scheduler, or ``relcache.begin_generation(..., timesteps=...)``) the first call of a
generation computes every step's projection in one batched product and each step reads its row.

(choice) Off by default (``relcache.enable(..., batch_modulation=True)``): it is exact up to rounding (a product of
``T·B`` rows may round differently from ``T`` products of ``B`` rows), not bit-identical. It applies only where it
cannot change what a step computes:

* only with autograd off, the projections and their sources in eval mode, not in the call whose FLOPs relcache
  measures (it computes everything) and not in a fake-tensor run;
* only at a call whose step is one of the announced timesteps' and whose conditioning tensors are the table's (the
  same objects, not modified in place, or equal values) and whose rows have the table's shape: a half-batch
  CFG-Cache call, a resized batch or a changed label computes the projection as usual, and so does every call whose
  latents are of another dtype than the generation's first call's (a model cast mid-generation, with its latents);
* the call's timestep is compared with the announced one at every step. On the CPU that is free and a mismatch
  computes the projection as usual. On an accelerator it would be a host sync per step, so the comparison is
  accumulated on the device and read once at the generation's end: a mismatch then raises ``ModulationMismatch``
  there, naming the fix (announce the timesteps the loop really passes).

FLOPs: the batched product executes what the steps' products would, so the counts are unchanged.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ..models.base import Modulation
from .attachment import DirectHook


class ModulationMismatch(RuntimeError):
    """A step's timestep differed from the announced one while batched modulation served it (on an accelerator,
    found at the generation's end)."""


class ModulationHost(Protocol):
    """What a projection's hook asks of the runtime."""

    def modulating(self) -> bool:
        """Whether a transformer call is running on real tensors (not a fake-tensor run)."""

    def measuring(self) -> bool:
        """Whether the running call measures FLOPs (each projection then also runs, to be counted)."""


def _same(a: torch.Tensor, b: torch.Tensor, version: int) -> bool:
    """``a`` is the table's conditioning tensor ``b`` (the same object at the same version) or equal to it."""
    if a is b:  # the table's own tensor: changed in place since means the table is stale (it is equal to itself)
        return a._version == version  # (an inference tensor has none: ``ModulationTable.matches`` compares values)
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _autocast(device: torch.device) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device``'s type, and its dtype: rows computed under it are not a plain call's."""
    on = torch.is_autocast_enabled(device.type)
    return on, torch.get_autocast_dtype(device.type) if on else None


#: the input dtypes autocast casts to its own for a product (float64 stays as it is)
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _host_comparable(timestep: Any, dtype: torch.dtype) -> bool:
    """A CPU tensor of ``dtype`` with at most one axis: its values read on the host compare as the tensors would."""
    return (type(timestep) is torch.Tensor and timestep.dtype == dtype and timestep.device.type == "cpu"
            and timestep.dim() <= 1)


class ModulationTable:
    """One call context's projections for every announced step of the generation."""

    def __init__(self, rows: list[torch.Tensor], timesteps: torch.Tensor, conditioning: tuple[torch.Tensor, ...],
                 call_timestep: torch.Tensor) -> None:
        self.rows = rows  # per projection: (T, B, out)
        self.latents_dtype: torch.dtype | None = None  # the dtype of the call's latents the rows were computed for
        self.autocast: tuple[bool, torch.dtype | None] = (False, None)  # autocast's state where they were computed
        self.timesteps = timesteps  # (T,) on the model's device, in the call's timestep dtype
        self.lazy = call_timestep.device.type != "cpu"  # accelerators: compare on the device, read at the end
        self.mismatch = torch.zeros((), dtype=torch.bool, device=call_timestep.device) if self.lazy else None
        self.index = torch.zeros((), dtype=torch.long, device=call_timestep.device)  # the step, for compiled code
        for t in (*rows, self.index):  # refilled in place: CUDA graphs read them where they are, never copy them
            torch._dynamo.mark_static_address(t)
        self.reset(conditioning)

    def reset(self, conditioning: tuple[torch.Tensor, ...]) -> None:
        """A new generation's conditioning; its comparisons start afresh."""
        self.conditioning = conditioning
        self.versions = [-1 if c.is_inference() else c._version for c in conditioning]
        # an inference tensor has no version counter: a copy, to compare by value (found by review: labels changed in
        # place under torch.inference_mode kept the old labels' rows)
        self.copies = [c.clone() if c.is_inference() else None for c in conditioning]
        # on the CPU, the announced timesteps as host numbers too: a call's comparison then launches no operator
        self.host_timesteps = None if self.lazy else self.timesteps.tolist()
        if self.mismatch is not None:
            self.mismatch.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes of the table's rows, timesteps and conditioning copies."""
        held = [*self.rows, self.timesteps, *(c for c in self.copies if c is not None)]
        return sum(t.numel() * t.element_size() for t in held)

    def matches(self, step: int, timestep: Any, conditioning: tuple[torch.Tensor, ...],
                latents_dtype: torch.dtype) -> bool:
        """Whether the call at ``step`` with this timestep, conditioning and latents' dtype may read the table: not
        where the latents' dtype moved since the rows were computed (a model cast in the middle of a generation, with
        its latents: the sources' rows would serve the old dtype; a cast between generations builds the next table in
        the new one), nor where autocast was turned on or off or changed its dtype since (found by review: the rows
        of a first call under bfloat16 autocast served later plain calls their bfloat16-rounded embeddings, whose
        dtype is float32 either way)."""
        if (not 0 <= step < self.timesteps.shape[0] or len(conditioning) != len(self.conditioning)
                or latents_dtype != self.latents_dtype or _autocast(self.timesteps.device) != self.autocast):
            return False
        for a, b, v, kept in zip(conditioning, self.conditioning, self.versions, self.copies, strict=True):
            if a is b and kept is not None:  # the table's own inference tensor: its values against the copy
                if self.lazy:  # as the timestep on an accelerator: no host wait, found at the generation's end
                    self.mismatch |= (a != kept).any()
                elif not torch.equal(a, kept):
                    return False
            elif not _same(a, b, v):
                return False
        if not self.lazy and self.host_timesteps is not None and _host_comparable(timestep, self.timesteps.dtype):
            ref = self.host_timesteps[step]  # the same comparison in the same dtype, on host numbers
            got = timestep.tolist()
            if not (got == ref if timestep.dim() == 0 else all(v == ref for v in got)):
                return False
        else:
            # compared with type promotion, not after a cast to the table's dtype: 519.5 is not an announced 519
            differs = (torch.as_tensor(timestep, device=self.timesteps.device) != self.timesteps[step]).any()
            if self.lazy:
                self.mismatch |= differs  # three kernels on an accelerator, no host wait
            elif bool(differs):
                return False
        self.index.fill_(step)
        return True

    def check(self) -> None:
        """At the generation's end: raise if a step served lazily (on an accelerator) had another timestep."""
        if self.mismatch is not None and bool(self.mismatch):
            raise ModulationMismatch(
                "relcache: batch_modulation served a step whose timestep was not the announced one, or whose "
                "conditioning (an inference tensor) was changed in place since the generation's first call, so that "
                "generation's output used another step's modulation. Announce the timesteps the loop passes "
                "(relcache.begin_generation(model, num_steps, timesteps=...)), pass changed conditioning as a new "
                "tensor, or enable without batch_modulation."
            )


class Modulations:
    """The tables of one enabled model, per call context, rebuilt each generation."""

    def __init__(self, spec: Modulation) -> None:
        self.spec = spec
        self.tables: dict[str, ModulationTable] = {}  # this generation's, per call context
        self.spare: dict[str, ModulationTable] = {}  # the previous generation's, refilled in place when they fit
        self.active: ModulationTable | None = None  # the table the running call reads, if any
        self.step = 0
        self.served = 0  # projections read from a table (counted eagerly), for tests and analyses
        self.sources_served = 0  # source calls read from a table (counted eagerly)

    def start_call(self, context: str, step: int, timesteps: torch.Tensor | None, args: tuple[Any, ...],
                   kwargs: dict[str, Any], latents_dtype: torch.dtype) -> None:
        """A call of ``context`` at ``step`` of a generation announcing ``timesteps`` (None: unknown), whose latents
        are of ``latents_dtype``, starts."""
        self.active = None
        if timesteps is None or torch.is_grad_enabled() or self._training():
            return
        timestep = self.spec.timestep(args, kwargs)
        if not isinstance(timestep, torch.Tensor):
            return
        conditioning = self.spec.conditioning(args, kwargs)
        table = self.tables.get(context)
        if table is None:
            if step != 0 or len(timesteps) == 0:
                return
            table = self.tables[context] = self._build(context, timesteps, timestep, conditioning, args, kwargs)
            table.latents_dtype, table.autocast = latents_dtype, _autocast(timestep.device)
        if table.matches(step, timestep, conditioning, latents_dtype):
            self.active, self.step = table, step

    @torch.no_grad()
    def _build(self, context: str, timesteps: torch.Tensor, timestep: torch.Tensor,
               conditioning: tuple[torch.Tensor, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
               ) -> ModulationTable:
        """Every announced step's projections, in one product per projection. The previous generation's table of
        this context is refilled in place where the shapes allow: compiled code then reads the same tensors (no
        new guards) and a captured graph the same addresses."""
        # a copy always: the table is refilled in place by the next generation, and the tensor given may be the
        # caller's own (begin_generation's, or a numpy array's memory): it was overwritten (found by review)
        ts = timesteps.to(device=timestep.device, dtype=timestep.dtype, copy=True)
        spec = self.spec
        outs = spec.source_outputs(ts, args, kwargs) if spec.sources and spec.source_outputs is not None else None
        inputs = spec.inputs(ts, args, kwargs, outs)  # per projection: (T·B, in)
        rows = [_project(proj, x, len(ts)) for proj, x in zip(spec.projections, inputs, strict=True)]
        rows += [out.reshape(len(ts), -1, *out.shape[1:]) for out in outs or ()]  # then per source: (T, B, out)
        old = self.spare.pop(context, None)
        if (old is not None and old.timesteps.shape == ts.shape and old.timesteps.dtype == ts.dtype
                and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                        for a, b in zip(old.rows, rows, strict=True))):
            for a, b in zip(old.rows, rows, strict=True):
                a.copy_(b)
            old.timesteps.copy_(ts)
            old.reset(conditioning)
            return old
        return ModulationTable(rows, ts, conditioning, timestep)

    def end_call(self) -> None:
        self.active = None

    def _training(self) -> bool:
        """Whether a projection or source is in training mode: its dropout (DiT's label dropout) would draw from the
        random generator for every row of a table, and the steps' own calls would draw other numbers (found by
        review: a model left in training mode gave other outputs with the option on)."""
        return any(m.training for m in self.spec.projections) or any(m.training for m in self.spec.sources)

    def new_generation(self, check: bool = True) -> None:
        """Check the finished generation's deferred comparisons (unless not ``check``: a rehearsed first call, whose
        rerun compares its step again), then drop its tables."""
        tables, self.tables, self.active = self.tables, {}, None
        self.spare.update(tables)
        for table in tables.values() if check else ():
            table.check()

    def release(self) -> list[ModulationTable]:
        """Drop every table (``disable``): the removed hooks still refer to this object until the cycle collector
        runs, and its tables (every step's projections) with it. Returns the running generation's, for the caller to
        check once it is done (``disable`` ends that generation: a hand-written loop's mismatch on an accelerator
        was never reported when the loop ended with ``disable``; found by review)."""
        running = list(self.tables.values())
        self.tables, self.spare, self.active = {}, {}, None
        return running

    @property
    def nbytes(self) -> int:
        """Bytes of the tables held (this generation's and the spare ones kept to be refilled in place)."""
        return sum(t.nbytes for t in (*self.tables.values(), *self.spare.values()))

    def row(self, index: int, x: torch.Tensor, saved: bool = True) -> torch.Tensor | None:
        """Projection ``index``'s output at the running step, or None when it must be computed; ``saved``: the
        product is not computed (``served`` counts it)."""
        table = self.active
        if table is None:
            return None
        rows = table.rows[index]
        # the dtype the call's own product would have: autocast's, under the autocast the table was built in
        # (``matches``), else its input's (rows of another are never served)
        want = table.autocast[1] if table.autocast[0] and x.dtype in _AUTOCAST_CASTS else x.dtype
        if tuple(rows.shape[1:-1]) != tuple(x.shape[:-1]) or rows.dtype != want:
            return None
        if torch.compiler.is_compiling():  # the step as data: one graph for every step (and no counter read)
            return _at_step(rows, table)
        self.served += saved
        return rows[self.step].clone()  # a copy: the caller may write into its output

    def source(self, index: int, saved: bool = True) -> torch.Tensor | None:
        """Source ``index``'s output at the running step (``Modulation.sources``), or None when it must be computed;
        ``saved`` as for ``row``."""
        table = self.active
        if table is None:
            return None
        rows = table.rows[len(self.spec.projections) + index]
        if torch.compiler.is_compiling():
            return _at_step(rows, table)
        self.sources_served += saved
        return rows[self.step].clone()


def _at_step(rows: torch.Tensor, table: ModulationTable) -> torch.Tensor:
    """The running step's row, the step read from the table's index tensor (compiled code)."""
    return rows.index_select(0, table.index.reshape(1))[0]


def _project(proj: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    out = proj(x)
    return out.reshape(steps, -1, *out.shape[1:])


class ModulationHook(DirectHook):
    """On one projection: its row of the running step's table instead of the product, where the table applies."""

    def __init__(self, tables: Modulations, index: int, host: ModulationHost) -> None:
        super().__init__()
        self.tables = tables
        self.index = index
        self.host = host

    def _applies(self, module: nn.Module) -> bool:
        """Whether a table may serve this call at all: autograd off, eval mode, a running call (or compiled code)."""
        return not (module.training or torch.is_grad_enabled()) and (
            torch.compiler.is_compiling() or self.host.modulating())

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if len(args) != 1 or kwargs or not self._applies(module):
            return forward(*args, **kwargs)
        measuring = not torch.compiler.is_compiling() and self.host.measuring()  # compiled: no guard on the meter
        out = self.tables.row(self.index, args[0], saved=not measuring)
        if out is None:
            return forward(*args)
        if measuring:
            # counted as a plain step computes it, but the table's row is what the call gets: the first generation
            # of a shape (whose first call measures) then gives what later ones give, bit for bit (found by review:
            # it differed by rounding)
            forward(*args)
        return out


class SourceHook(ModulationHook):
    """On one source of the projections' inputs (``Modulation.sources``): its row of the running step's table instead
    of its computation, where the table applies. The model calls a source only on the call's timestep and
    conditioning (the adapter's word), so its arguments are not read."""

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        forward = self.fn_ref.original_forward
        if not self._applies(module):
            return forward(*args, **kwargs)
        measuring = not torch.compiler.is_compiling() and self.host.measuring()
        out = self.tables.source(self.index, saved=not measuring)
        if out is None:
            return forward(*args, **kwargs)
        if measuring:  # counted as a plain step computes it, the table's row returned (``ModulationHook``)
            forward(*args, **kwargs)
        return out
