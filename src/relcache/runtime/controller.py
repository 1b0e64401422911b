"""One session per enabled model: its config, hooks and contexts, attach and detach, the generation host, and its
stats. What the session does at the start and end of each transformer call is ``calls.py``, and what each cached
module does at a step (forecast, or compute and record) is ``modules.py``; both are mixed in.
"""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, warn
from ..methods.config import CacheConfig
from ..methods.history import StaticCaches
from ..models.base import Adapter, CachedModule
from .accounting import FlopMeter
from .attachment import Attachment
from .budget import CacheBudget
from .calls import StepCalls
from .cfg import CFGRunner
from .context import Context
from .distributed import check_split_storage, reducer_for
from .experts import ExpertCalls, Experts
from .generations import Generations
from .hooks import MODULATION_HOOK, MODULE_HOOK, SHARED_HOOK, SOURCE_HOOK, STEP_HOOK, ModuleHook, StepHook
from .modulation import ModulationHook, Modulations, SourceHook
from .modules import ModuleCalls, ModuleSlot
from .regional import CUDA_GRAPH_DEVICES, cached_apart, captured_apart, compiled_apart
from .rehearsal import Rehearsals
from .shared import SharedGroup, SharedHook
from .stats import CacheStats, combine, with_peaks
from .steps import Prober, Probing


class Session(StepCalls, ModuleCalls):
    """Everything relcache attaches to one model: config, modules, hooks and per-context state."""

    def __init__(
        self, model: nn.Module, config: CacheConfig, modules: list[CachedModule], adapter: Adapter,
        record_errors: bool, count_flops: bool = True, sequence_group: Any = None, experts: Experts | None = None,
        batch_modulation: bool = False,
    ) -> None:
        self.model = model
        self.config = config
        self.cached_modules = list(modules)  # a replaced module is followed (``_follow_replaced_modules``)
        self.adapter = adapter
        self.record_errors = record_errors
        self.count_flops, self.batch_modulation = count_flops, batch_modulation  # as given (a second enable compares)
        self.meter = FlopMeter(count_flops)
        self.generations = Generations(self, adapter)
        self.contexts: dict[str, Context] = {}
        self.current: Context | None = None  # the context of the transformer call running now
        cfg = config.cfg_cache
        if cfg is not None:  # skip_full=None: skip at full steps only where the schedule computes every step
            cfg = replace(cfg, skip_full=cfg.skips_full(config.schedule.every_step_full))
        self.cfg = CFGRunner(cfg, adapter, self._run, lambda: self.generations.guidance) if cfg else None
        self.shared = [SharedGroup(g) for g in adapter.shared_modules(model)]  # computed once per call
        spec = adapter.modulation(model) if batch_modulation else None
        self.modulation = Modulations(spec) if spec is not None else None  # every step's adaLN at once
        self.hooks = Attachment(model)
        # several transformers run in turn (Wan 2.2's experts, ``experts.py``): ``model`` is the first of them
        self.experts = experts
        self._expert_hooks = [Attachment(e.model) for e in experts.experts[1:]] if experts is not None else []
        # each cached module as its hook reaches it (``ModuleSlot``), bound to the running context's caches
        self.slots = [ModuleSlot(idx, spec) for idx, spec in enumerate(self.cached_modules)]
        for slot, after in zip(self.slots, self.slots[1:], strict=False):
            slot.next = after
        self._bound: Any = None  # the caches the slots are bound to (``bind_slots``)
        self._called: set[int] = set()  # the cached modules the running call has called (eagerly)
        self.prober = Prober()
        self.probing: Probing | None = None  # a compiled RCS step's pre-pass, pending until its forward starts
        self._call_sig: tuple[Any, ...] = ()  # (the running expert, the shapes of the running call's tensor arguments)
        self._compiled_call = False  # the running call's forward is compiled
        self._paths: dict[int, str] = {}  # cached module index -> where it sits in the model (set by ``attach``)
        self._n_modules = 0  # how many modules the model had when its FLOPs were last measured
        # context parallelism: token reductions summed over the processes holding the sequence's slices
        # the settings every process must share: the config, and whether forecasts are checked against the module
        # (``record_errors`` runs the module at cached steps: its collectives too); not the label ``name``, which
        # changes no step (found by review: a per-rank label raised ContextParallelMismatch)
        self.reducer = reducer_for(model, sequence_group, repr((replace(config, name=None), record_errors)))
        check_split_storage(self.reducer, config.storage)
        self.budget = CacheBudget(config)  # max_cache_bytes: each context's storage
        # (choice) caches held in place at stable addresses (CUDA graphs, docs/spec.md §Capture): None = for the
        # contexts whose calls run under torch.compile; True/False = always/never. The buffers outlive generations.
        self.static_caches: bool | None = None
        self.static = StaticCaches()
        self._completed = False  # the running call returned (``end_call``: else its unrecorded slots go back)
        self.rehearsals = Rehearsals()  # the first calls whose compiled form ran (``rehearse``)
        self.first_call = False  # the running call is a rehearsed first call, compiled (``hooks.StepHost``)
        self.step_hooks: list[StepHook] = []  # one per transformer (``attach``)
        self.cfg_peak = 0  # the most CFG-Cache held at the end of a call in this generation (``stats``' peak)
        self._warned_apart = False  # ``_check_compiled_blocks`` said so, once per enable
        self._warned_captured = False  # ``_check_captured_blocks`` said so, once per enable
        self._sharing_dropped = False  # ``drop_sharing`` ran

    def __deepcopy__(self, memo: dict[int, Any]) -> Session:
        """Refused: diffusers' hooks keep the original model's forward, so a deep copy of an enabled model ran the
        original (its weights, its caches, its generation), whatever was done to the copy's weights."""
        raise ConfigError("copy.deepcopy of a model or pipeline with relcache enabled is refused: the copy would "
                          "keep running the original's forward and caches. relcache.disable(...) before copying, "
                          "then enable each copy")

    def __reduce_ex__(self, protocol: object) -> Any:
        """Refused too (``torch.save(model)``, ``pickle``): the hooks are the live session's, and pickling failed on
        one of its objects with a message that named neither relcache nor the way out (2026-12-06)."""
        raise ConfigError("pickling (torch.save) a model or pipeline with relcache enabled is refused: its hooks "
                          "hold the live session. Save its weights (model.state_dict(), save_pretrained), or call "
                          "relcache.disable(...) first")

    # -- attach / detach ---------------------------------------------------------------------------------------
    def attach(self, pipeline: Any) -> None:
        """Register the hooks; on a pipeline, also let its scheduler and the end of its calls mark generations."""
        paths: dict[int, dict[int, str]] = {}  # per transformer: id(module) -> its path there
        for e, (root, hooks) in enumerate(self._roots()):
            step_hook = StepHook(self if self.experts is None else ExpertCalls(self, e))
            self.step_hooks.append(step_hook)
            hooks.register(root, step_hook, STEP_HOOK)
            paths[id(root)] = {id(module): path for path, module in root.named_modules()}
        for idx, spec in enumerate(self.cached_modules):
            root, hooks = self._root_of(idx)
            hooks.register(spec.module, ModuleHook(self, self.slots[idx]), MODULE_HOOK)
            if id(spec.module) in paths[id(root)]:
                self._paths[idx] = paths[id(root)][id(spec.module)]
        self._n_modules = sum(len(p) for p in paths.values())
        if self.modulation is not None:
            for i, module in enumerate(self.modulation.spec.projections):
                self.hooks.register(module, ModulationHook(self.modulation, i, self), MODULATION_HOOK)
            for i, module in enumerate(self.modulation.spec.sources):
                self.hooks.register(module, SourceHook(self.modulation, i, self), SOURCE_HOOK)
        # last, so outermost: ``drop_sharing`` takes them off cleanly (a table's source, shared, is read once)
        for group in self.shared:
            for i, module in enumerate(group.modules):
                self.hooks.register(module, SharedHook(group, i, self), SHARED_HOOK)
        for _, hooks in self._roots():
            hooks.done()
        if pipeline is not None:
            self.generations.watch(pipeline)

    def detach(self) -> None:
        """Remove every hook and patch, leaving modules exactly as they were, and drop every tensor the session
        holds. The session, its hooks and its contexts refer to each other, so without the drop its caches lived on
        after ``disable`` until Python's cycle collector ran: FORA's first FLUX.1 call at 1024x1024 holds 6 GiB, and
        enabling method after method ran an H200 out of memory (2026-12-04). Under torch.compile, dynamo's tracing
        leftovers (reference cycles) hold the static buffers too: where there were some, the cycle collector runs
        here, once (found by review)."""
        compiled = bool(self.static.buffers)  # static buffers exist where calls ran compiled
        for _, hooks in reversed(self._roots()):
            hooks.detach()
        self.generations.unwatch()
        self.generations.timesteps = None  # the announced ones
        self.contexts, self.current = {}, None
        self.clear_computing()
        self.bind_slots(None)
        for slot in self.slots:  # their step-row positions (tensors on the model's device)
            slot.position = None
        self.static = StaticCaches()
        for step_hook in self.step_hooks:
            step_hook.release()
        self.step_hooks = []
        self.prober, self.probing = Prober(), None
        # the removed hooks still refer to it: its tables go now, the running generation's checked last
        unchecked = self.modulation.release() if self.modulation is not None else []
        self.modulation = None
        for group in self.shared:
            group.new_generation()
        for part in (self.cfg, self.reducer, self.experts):
            if part is not None:
                part.reset()
        if compiled:
            gc.collect()
        for table in unchecked:  # disable ends the generation: a lazily found mismatch raises (ModulationMismatch)
            table.check()

    def _roots(self) -> list[tuple[nn.Module, Attachment]]:
        """Each transformer the session serves (one, or the experts in order) and its hooks."""
        if self.experts is None:
            return [(self.model, self.hooks)]
        return list(zip([e.model for e in self.experts.experts], [self.hooks, *self._expert_hooks], strict=True))

    def _root_of(self, idx: int) -> tuple[nn.Module, Attachment]:
        """The transformer holding cached module ``idx``, and its hooks."""
        if self.experts is None:
            return self.model, self.hooks
        return self._roots()[self.experts.experts.index(self.experts.of_module(idx))]

    def _follow_replaced_modules(self) -> None:
        """(choice) At each context's first call of a generation: a cached module replaced in the model since
        ``enable`` (a LoRA loaded after it wraps the module, unloading one puts the wrapped module back) has its hook
        moved to the module now in its place, so that what is cached is what the model runs; a cached module's place
        gone from the model is an error. When the model's modules changed at all, FLOPs are measured again."""
        moved = False
        for idx, path in self._paths.items():
            root, hooks = self._root_of(idx)
            try:
                now = root.get_submodule(path)
            except AttributeError:
                raise RuntimeError(
                    f"the cached module {path!r} was removed from the {type(root).__name__} after "
                    "relcache.enable; call relcache.disable and relcache.enable again"
                ) from None
            spec = self.cached_modules[idx]
            if now is not spec.module:
                hooks.move(spec.module, now, ModuleHook(self, self.slots[idx]), MODULE_HOOK)
                self.cached_modules[idx] = self.slots[idx].spec = replace(spec, module=now)  # moved: then named
                moved = True
        if moved:
            for _, hooks in self._roots():
                hooks.done()
        n_modules = sum(1 for root, _ in self._roots() for _ in root.modules())
        if moved or n_modules != self._n_modules:  # e.g. a LoRA on modules that are not cached: other FLOPs
            self.meter.module.clear()
            self.meter.other.clear()
            self.rehearsals.clear()  # first calls run eagerly again, to measure
            self._n_modules = n_modules

    def _check_compiled_blocks(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Mark the cached modules that sit in blocks compiled one by one (regional compilation: ``slot.apart``, so
        their hooks pick their step rows by a tensor, placed here on the device of the call's latents, where the step
        rows are made unless a model split over devices makes them elsewhere (then the row is picked by the index:
        correct, but graphs per block again), and blocks of a class share graphs, one per kind of step). Here, on the
        host: under regional compilation even a call relcache runs eagerly compiles the blocks, so no module call of
        theirs would place it untraced.

        (choice) Warn once per enable where such blocks hold modules whose hooks still read a per-module index, a
        constant of each block's graphs: batch modulation's projections and sources (``ModulationHook``,
        ``SourceHook``; shared copies' hooks step aside under compile and read none). Each
        block then compiles graphs of its own, and dynamo counts them per block class against ``recompile_limit``
        (8) and ``accumulated_recompile_limit`` (256): past either the remaining blocks run eagerly, without error.
        Not where both allow 8 graphs per block."""
        cached = [m.module for m in self.cached_modules]
        apart = set().union(*(cached_apart(root, cached) for root, _ in self._roots()))
        device = self.adapter.hidden_of(args, kwargs).device if apart else None  # the step rows' (``prepare_step``)
        for slot in self.slots:
            slot.apart = id(slot.spec.module) in apart
            slot.place(device)
        if apart and device is not None:
            self._check_captured_blocks(device, cached)
        indexed = [] if self.modulation is None else [*self.modulation.spec.projections, *self.modulation.spec.sources]
        if self._warned_apart:
            return
        config = torch._dynamo.config
        limit = min(config.recompile_limit, config.accumulated_recompile_limit)
        if not indexed:
            if apart:
                self._check_regional_graphs(limit)
            return
        counts = sum((compiled_apart(root, indexed) for root, _ in self._roots()), Counter())
        over = {name: n for name, n in counts.items() if n >= 2 and limit < 8 * n}
        if over:
            self._warned_apart = True
            blocks = ", ".join(f"{n} {name}" for name, n in over.items())
            need = 8 * max(over.values())
            warn(f"relcache: {blocks} blocks are compiled one by one (regional compilation, e.g. "
                 "compile_repeated_blocks) and hold batch modulation's projections, whose hooks read each one's "
                 "index: each block compiles graphs of its own, and dynamo counts them per block class "
                 f"against recompile_limit ({config.recompile_limit}) and accumulated_recompile_limit "
                 f"({config.accumulated_recompile_limit}): past either the remaining blocks run eagerly. Compile the "
                 "whole transformer instead (torch.compile(pipe.transformer)), enable without batch_modulation, or "
                 f"set both torch._dynamo.config limits to at least {need} (docs/how-it-works.md)")

    def _check_regional_graphs(self, limit: int) -> None:
        """(choice) Warn once per enable where the blocks compiled one by one share graphs, but the predictor needs
        more per block class (one per kind of step and history length, ``Predictor.regional_graphs``) than dynamo's
        limits allow: past them the class's remaining calls run eagerly, without error, in every later generation
        (found by review: RFC on a FLUX pipeline needs 10 at order 2 against the default 8, and the second generation
        ran most block calls eagerly)."""
        need = self.config.predictor.regional_graphs()
        if need is None or limit >= need:
            return
        self._warned_apart = True
        config = torch._dynamo.config
        warn(f"relcache: blocks holding cached modules are compiled one by one (regional compilation, e.g. "
             f"compile_repeated_blocks), and with {self.config.label} each block class compiles about {need} graphs "
             f"(one per kind of step and forecast order, measured on a FLUX-like pipeline, once a generation has run "
             f"enough full steps to fill the forecast history): more than dynamo's "
             f"recompile_limit ({config.recompile_limit}) or accumulated_recompile_limit "
             f"({config.accumulated_recompile_limit}) allow, so past them that class's calls run eagerly in every "
             f"later generation. Set both torch._dynamo.config limits to at least {2 * need} (the measured count "
             "doubled: other models add layouts), or compile the whole transformer (torch.compile(pipe.transformer), "
             "the tested path; docs/how-it-works.md)", RuntimeWarning)

    def _check_captured_blocks(self, device: torch.device, cached: list[nn.Module]) -> None:
        """(choice) Warn once per enable where blocks holding cached modules are compiled on their own to replay CUDA
        graphs (``compile_repeated_blocks(mode="reduce-overhead")``) and the call runs where inductor captures them.
        Their steps are not compiled steps to relcache, so it holds the records out of place, as outputs of the
        block's graph that its next replay overwrites: a CUDA-graph error about a tensor "overwritten by a subsequent
        run", or caches that silently changed. A warning, not a refusal: not yet run on a GPU (docs/how-it-works.md,
        "Compiled steps"). Not where the session's ``static_caches`` is True: it copies every record into buffers
        held in place (with graphs per block again, ``history.StaticCaches``)."""
        if self._warned_captured or self.static_caches is True or device.type not in CUDA_GRAPH_DEVICES:
            return
        counts = sum((captured_apart(root, cached) for root, _ in self._roots()), Counter())
        if counts:
            self._warned_captured = True
            blocks = ", ".join(f"{n} {name}" for name, n in counts.items())
            warn(f"relcache: {blocks} blocks hold cached modules and are compiled one by one to replay CUDA graphs "
                 "(e.g. compile_repeated_blocks(mode=\"reduce-overhead\") or mode=\"max-autotune\"). relcache holds "
                 "their records between steps as outputs of the blocks' graphs, which the next replay overwrites: "
                 "expect CUDA-graph errors or wrong images. Compile the whole transformer with that mode "
                 "(torch.compile(pipe.transformer, mode=\"reduce-overhead\"): relcache then keeps its caches in "
                 "place), or compile the blocks without CUDA graphs (the default mode or "
                 "mode=\"max-autotune-no-cudagraphs\")")

    # -- generations (relcache.runtime.generations.GenerationHost) -----------------------------------------------
    def reset_generation(self, rehearsal: bool = False) -> None:
        """Forget the generation's state (``rehearsal``: only its first call ran, which runs again; the contexts of
        the previous generation stay those the budget counts, and lazy modulation checks wait for the rerun)."""
        if not rehearsal:
            self.budget.end_generation(self.contexts)
            self.rehearsals.settle(self.static.epoch)  # buffers made anew after its first call fit it too
        self.static.detach()
        for group in self.shared:
            group.new_generation()
        self.contexts = {}
        self.cfg_peak = 0
        self.current = None
        self.bind_slots(None)  # the modules' slots let go of the ended generation's caches
        if self.experts is not None:
            self.experts.reset()
        if self.cfg is not None:
            self.cfg.reset()
        if self.reducer is not None:
            self.reducer.reset()
        if self.modulation is not None:  # last: may raise for the generation that ended (ModulationMismatch)
            self.modulation.new_generation(check=not rehearsal)

    def free_caches(self) -> None:
        for ctx in self.contexts.values():
            ctx.caches.clear_states()
            self.config.schedule.release(ctx.schedule.memory)
        if self.cfg is not None:
            self.cfg.reset()
        if self.reducer is not None:  # deferred sums hold their states
            self.reducer.reset()
        if self.modulation is not None:  # last: may raise for the generation that ended (ModulationMismatch)
            self.modulation.new_generation()

    def steps_run(self) -> tuple[int, int]:
        longest = max(self.contexts.values(), key=lambda ctx: ctx.step, default=None)
        return (0, 0) if longest is None else (longest.step + 1, len(longest.schedule.full_steps))

    def short_contexts(self) -> list[tuple[str, int, int]]:
        """(name, steps run, full steps) of each call context that ran fewer steps than the generation's longest,
        under a ``target_nfc`` budget: planned for every step, it spent fewer than K in the calls it made."""
        if getattr(self.config.schedule, "target_nfc", None) is None:
            return []
        run = max((ctx.step for ctx in self.contexts.values()), default=-1)
        return [(ctx.name, ctx.step + 1, len(ctx.schedule.full_steps)) for ctx in self.contexts.values()
                if ctx.step < run]

    def end_generation(self) -> None:
        self.generations.end()

    # -- shared copies (relcache.runtime.shared.SharingHost) -----------------------------------------------------
    def sharing(self) -> bool:
        return self.current is not None

    def drop_sharing(self) -> None:
        """(choice) At the first call whose whole forward is compiled (``torch.compile`` of the transformer), take the
        shared copies' hooks off for good: they never share under compile, and each hook's wrapper put about 20 dynamo
        guards per copy into every compiled frame (docs/performance.md). Later eager calls compute every copy; results
        are the same. Blocks compiled one by one (``compile_repeated_blocks``) keep the hooks: the step runs eagerly
        there, and nothing here sees their compile."""
        if self.shared and not self._sharing_dropped:
            self._sharing_dropped = True
            self.hooks.remove_all(SHARED_HOOK)

    def flop_counter_now(self) -> Any:
        return self.meter.counter

    def add_saved_flops(self, flops: float) -> None:
        self.meter.shared_saved += flops

    # -- batched modulation (relcache.runtime.modulation.ModulationHost) ----------------------------------------------
    def modulating(self) -> bool:
        return self.current is not None and self.budget.probe is None

    def measuring(self) -> bool:
        return self.meter.counter is not None

    # -- stats --------------------------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        names = [m.name for m in self.cached_modules]
        per = {name: ctx.stats(names, self.meter.unknown) for name, ctx in self.contexts.items()}
        cfg_bytes = self.cfg.state.nbytes if self.cfg is not None else 0
        kinds = {m.name: m.kind for m in self.cached_modules}
        # before any step, or after a first call that raised, every FLOP field is NaN (nothing counted): said, not
        # None (found by review)
        counted = any(c.full_flops > 0 for c in per.values())
        unknown = self.meter.unknown or (None if counted else "no step has completed yet" if per else
                                         "no step has run yet")
        total = with_peaks(combine(self.config.label, per, cfg_bytes, kinds, unknown))
        held = self.static.nbytes + (self.modulation.nbytes if self.modulation is not None else 0)
        total = replace(total, peak_cache_bytes=total.peak_cache_bytes + self.cfg_peak, buffer_bytes=held)
        if self.experts is None:
            return total
        return replace(total, experts=self.experts.stats(self.config.label, self.contexts, per, kinds, names,
                                                         self.meter.unknown))
