"""Other libraries' caches on the same model: the extra rows of ``relcache bench --peers``.

diffusers ships TaylorSeer, First-Block Cache, MagCache and FasterCache as hooks; cache-dit ships DBCache.
``DiTTransformer2DModel`` lacks diffusers' ``CacheMixin`` (no ``enable_cache``), so each peer applies the
library's hooks itself and supplies what a diffusers pipeline would: a cache context around every transformer
call (with step index and timestep), a state reset before every generation, the current timestep (FasterCache),
and the model's magnitude ratios (MagCache, from diffusers' own calibration mode). ``detach`` removes every hook
and every attribute the library added, so the model is exactly as before.

Every peer measures its realized NFC honestly: a forward hook on the last ``Linear`` of the last block's
feed-forward records the timesteps at which that layer really ran (``nfc(model)``).

The peers assume one transformer call per denoising step (CFG batched, as ``sample_digits`` does); MagCache
checks it. Budgets are NFC of 50 DDIM steps, as in ``bench.default_methods``: TaylorSeer gets the interval and
warm-up that give exactly that NFC under diffusers' schedule; the threshold-based peers (First-Block Cache,
MagCache, DBCache) get thresholds calibrated on the shipped reference model (``REFERENCE_THRESHOLDS``; redo with
``python -m relcache.evaluation.peers``). Realized NFC and FLOPs are measured by the bench anyway.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.hooks.mag_cache import MagCacheHeadHook
from torch import nn

from .bench import DEFAULT_BUDGETS, INTERVAL_FOR_NFC, BenchMethod, Peer

Sampler = Callable[..., torch.Tensor]

#: the one cache context: the sampler makes one (CFG-batched) transformer call per step
CONTEXT = "batched_cfg"

#: budget (NFC of 50 steps) -> (cache_interval, disable_cache_before_step) of diffusers' TaylorSeer. Its
#: schedule computes steps 0..w-1, predicts step w, then computes w+1, w+1+N, ...: NFC = w + (48-w)//N + 1.
#: Warm-up 2 (relcache's) where it gives the budget exactly, else warm-up 1.
TAYLORSEER_SCHEDULE = {14: (4, 2), 11: (5, 1), 10: (6, 2), 8: (7, 1), 7: (9, 1)}

#: budget -> MagCache's max_skip_steps (K): one more than the steps FORA skips at that budget, so the threshold
#: (not the cap) decides; retention (never skip) is the first 2 steps, relcache's warm-up.
MAG_MAX_SKIP = dict(INTERVAL_FOR_NFC)
MAG_RETAINED_STEPS = 2

#: cache-dit DBCache settings: F1B0 (only the first block always computes; cache-dit's First-Block-Cache-like
#: setting, so skipped steps skip all other blocks), TaylorSeer calibrator of order 1 (cache-dit's recommended
#: pairing), warm-up 2 steps.
CACHE_DIT_FN, CACHE_DIT_BN, CACHE_DIT_WARMUP, CACHE_DIT_TAYLOR_ORDER = 1, 0, 2, 1

#: Thresholds for the threshold-based peers on the shipped reference model (trained 1580 steps), DDIM 50 steps,
#: CFG 1.5, one batch of 10 (classes 0..9, seed 0): per budget, the smallest threshold whose realized NFC equals
#: it, found by bisection with ``python -m relcache.evaluation.peers`` (``calibrate_thresholds``; ~4 min on
#: 1 CPU thread). Every one hit its budget exactly on that batch. Budget -> threshold.
REFERENCE_THRESHOLDS: dict[str, dict[int, float]] = {
    "fbcache": {14: 0.0584, 11: 0.0786, 10: 0.0949, 8: 0.118, 7: 0.131},
    "magcache": {14: 0.0899, 11: 0.142, 10: 0.181, 8: 0.346, 7: 0.376},
    "cache_dit": {14: 0.0616, 11: 0.0949, 10: 0.1, 8: 0.131, 7: 0.154},
}


# -- plumbing ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(*prefixes: str) -> Iterator[None]:
    """Raise every logger under ``prefixes`` to ERROR for the block (libraries' per-attach chatter)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in (*prefixes, *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _timestep_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    """The (first) timestep of a DiT call ``model(hidden_states, timestep, class_labels, ...)``."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)


def _blocks(model: nn.Module) -> nn.ModuleList:
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise TypeError(f"{type(model).__name__} has no transformer_blocks: the peers need a diffusers DiT")


def _probe_module(model: nn.Module) -> nn.Module:
    """The last ``Linear`` of the last block's feed-forward: it runs exactly when that block really computes."""
    block = _blocks(model)[-1]
    scope = getattr(block, "ff", block)
    linears = [m for m in scope.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"no Linear layer in the last block of {type(model).__name__}")
    return linears[-1]


class _ModelState:
    """A model's modules before a peer attached: ``restore`` removes everything added since.

    Libraries leave traces after their own removal (an empty ``_diffusers_hook`` registry, the original bound
    ``forward`` as an instance attribute, cache-dit's patched DiT ``forward`` and a registered ``_norm1_emb``
    alias, children re-inserted out of order by cache-dit's ``mock.patch`` of the block list), so after removing
    the hooks the snapshot deletes every new instance attribute and child module, restores the children's order
    and puts back a pre-existing instance ``forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.attrs = [set(vars(m)) for m in self.modules]
        self.children = [list(m._modules) for m in self.modules]
        self.forwards = [vars(m).get("forward") for m in self.modules]
        self.hooks = [set(r.hooks) if (r := vars(m).get("_diffusers_hook")) is not None else set()
                      for m in self.modules]

    def added_hooks(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of every diffusers hook registered since the snapshot, in registration order."""
        added = []
        for module, before in zip(self.modules, self.hooks, strict=True):
            registry = vars(module).get("_diffusers_hook")
            if registry is not None:
                added += [(module, name) for name in registry.hooks if name not in before]
        return added

    def restore(self) -> None:
        for module, name in reversed(self.added_hooks()):
            module._diffusers_hook.remove_hook(name, recurse=False)
        for module, attrs, children, forward in zip(self.modules, self.attrs, self.children, self.forwards,
                                                    strict=True):
            if list(module._modules) != children:  # drop added children, restore the order (mock.patch reorders)
                kept = {name: module._modules[name] for name in children if name in module._modules}
                module._modules.clear()
                module._modules.update(kept)
            for name in set(vars(module)) - attrs:
                del vars(module)[name]
            if forward is not None:
                vars(module)["forward"] = forward
        for module in self.modules:  # registries that stay: their cached child lists may be stale
            registry = vars(module).get("_diffusers_hook")
            if registry is not None:
                registry.invalidate_child_registries_cache()


class _CountingPeer:
    """Shared plumbing of every peer: snapshot, a hook around each transformer call, the NFC probe."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._state: _ModelState | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._timestep: float | None = None
        self._calls = 0
        self._ran: set[float] = set()

    # the Peer protocol
    def attach(self, model: nn.Module) -> None:
        if self._state is not None:
            raise RuntimeError(f"{self.label} is already attached to a model; detach it first")
        self._state = _ModelState(model)
        try:
            probe = _probe_module(model)
            self._apply(model)
            self._handles = [
                model.register_forward_pre_hook(self._before_call, with_kwargs=True),
                model.register_forward_hook(self._after_call, with_kwargs=True),
                probe.register_forward_hook(self._probe),
            ]
        except BaseException:
            self.detach(model)
            raise

    def before_generation(self, model: nn.Module) -> None:
        self._calls, self._ran, self._timestep = 0, set(), None
        self._reset(model)

    def detach(self, model: nn.Module) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._state is None:
            return
        try:
            self._remove(model)
        finally:
            self._state.restore()
            self._state = None

    def nfc(self, model: nn.Module) -> float:
        """Steps of the last generation at which the last block's feed-forward really ran."""
        return float(len(self._ran))

    # what subclasses provide
    def _apply(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _reset(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _remove(self, model: nn.Module) -> None:
        """Library-side removal; the snapshot restore follows in any case."""

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._timestep = _timestep_of(args, kwargs)
        self._calls += 1
        return None

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        return None

    def _probe(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._ran.add(self._timestep if self._timestep is not None else float(self._calls))


# -- diffusers' hooks -------------------------------------------------------------------------------------
class DiffusersCachePeer(_CountingPeer):
    """One of diffusers' cache hooks (``apply(model)`` registers them) on a bare transformer.

    Sets a ``CacheContext`` (name, step index, timestep) around every call, as a pipeline's ``cache_context``
    would, and resets the hooks' state before each generation.
    """

    def __init__(self, label: str, apply: Callable[[nn.Module], None]) -> None:
        super().__init__(label)
        self._apply_hooks = apply

    def _apply(self, model: nn.Module) -> None:
        with _quiet("diffusers.hooks"):
            self._apply_hooks(model)
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()

    def _reset(self, model: nn.Module) -> None:
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        super()._before_call(module, args, kwargs)
        _set_cache_context(module, CacheContext(CONTEXT, step_index=self._calls - 1, timestep=self._timestep))
        return None

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        _set_cache_context(module, None)
        return None


def diffusers_taylorseer(label: str, interval: int, warmup: int, order: int = 2) -> DiffusersCachePeer:
    """diffusers' TaylorSeer on every block's self-attention and feed-forward (relcache's cached modules).

    Full steps: the first ``warmup``, then every ``interval`` from ``warmup + 1`` on; the others are Taylor
    forecasts of order ``order`` from the last full steps (factors kept in float32).
    """
    config = TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=warmup, max_order=order,
        taylor_factors_dtype=torch.float32, cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"],
    )
    return DiffusersCachePeer(label, lambda model: apply_taylorseer_cache(model, config))


def diffusers_first_block_cache(label: str, threshold: float) -> DiffusersCachePeer:
    """diffusers' First-Block Cache: skip all later blocks while the first block's residual changes less than
    ``threshold`` (relative mean absolute change), reusing their cached residual."""
    return DiffusersCachePeer(label, lambda model: apply_first_block_cache(model, FirstBlockCacheConfig(threshold)))


_MAG_RATIOS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, float], list[float]]] = weakref.WeakKeyDictionary()


def calibrate_mag_ratios(model: nn.Module, num_steps: int = 50, sampler: Sampler | None = None,
                         guidance_scale: float = 1.5, num_samples: int = 4, seed: int = 0) -> list[float]:
    """MagCache's per-step magnitude ratios of ``model``, from diffusers' calibration mode.

    One uncached generation (classes 0, 1, ...) with ``MagCacheConfig(calibrate=True)``, which records
    ``mean ‖r_t‖ / ‖r_{t-1}‖`` of the blocks' residual at every step; ``sampler`` defaults to the reference
    model's ``sample_digits`` (it works for any class-conditional DiT).
    """
    if sampler is None:
        from .reference import sample_digits as sampler
    # one step more than the run: diffusers clears (and prints) the ratios after its last step
    config = MagCacheConfig(calibrate=True, num_inference_steps=num_steps + 1)
    peer = DiffusersCachePeer("MagCache calibration", lambda m: apply_mag_cache(m, config))
    labels = torch.arange(num_samples) % int(model.config.num_embeds_ada_norm)
    peer.attach(model)
    try:
        peer.before_generation(model)
        sampler(model, labels, num_steps=num_steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed))
        assert peer._state is not None
        heads = [m._diffusers_hook.get_hook(name) for m, name in peer._state.added_hooks()]
        head = next(h for h in heads if isinstance(h, MagCacheHeadHook))
        head.state_manager.set_context(CacheContext(CONTEXT))
        ratios = [float(r) for r in head.state_manager.get_state().calibration_ratios]
    finally:
        peer.detach(model)
    if len(ratios) != num_steps:
        raise RuntimeError(f"MagCache calibration recorded {len(ratios)} ratios for {num_steps} steps: the sampler "
                           "must make one transformer call per step")
    return ratios


class DiffusersMagCache(DiffusersCachePeer):
    """diffusers' MagCache: skip all blocks while the accumulated magnitude-ratio error stays below
    ``threshold`` (at most ``max_skip_steps`` in a row, never in the first ``retained_steps``).

    The ratios are model-specific: unless given, they are calibrated on first attach to a model with
    :func:`calibrate_mag_ratios` (one extra, untimed generation) and kept for that model. ``num_steps`` must be
    the sampler's number of steps (diffusers indexes the ratios by step); a run of another length raises.
    """

    def __init__(self, label: str, threshold: float, max_skip_steps: int, num_steps: int = 50,
                 retained_steps: int = MAG_RETAINED_STEPS, mag_ratios: Sequence[float] | None = None,
                 sampler: Sampler | None = None, guidance_scale: float = 1.5) -> None:
        super().__init__(label, self._apply_mag)
        self.threshold, self.max_skip_steps, self.num_steps = threshold, max_skip_steps, num_steps
        self.retention_ratio = retained_steps / num_steps  # diffusers keeps int(ratio * steps + 0.5) steps
        self.mag_ratios = list(mag_ratios) if mag_ratios is not None else None
        self._sampler, self._guidance = sampler, guidance_scale

    def ratios_for(self, model: nn.Module) -> list[float]:
        """The given ratios, else this model's calibrated ones (calibrating once per model and step count)."""
        if self.mag_ratios is not None:
            return self.mag_ratios
        per_model = _MAG_RATIOS.setdefault(model, {})
        key = (self.num_steps, self._guidance)
        if key not in per_model:
            per_model[key] = calibrate_mag_ratios(model, self.num_steps, self._sampler, self._guidance)
        return per_model[key]

    def attach(self, model: nn.Module) -> None:
        self.ratios_for(model)  # before the snapshot: calibration attaches and detaches its own hooks
        super().attach(model)

    def _apply_mag(self, model: nn.Module) -> None:
        apply_mag_cache(model, MagCacheConfig(
            threshold=self.threshold, max_skip_steps=self.max_skip_steps, retention_ratio=self.retention_ratio,
            num_inference_steps=self.num_steps, mag_ratios=torch.tensor(self.ratios_for(model)),
        ))

    def _check_length(self) -> None:
        if 0 < self._calls != self.num_steps:
            made = f"more than {self.num_steps}" if self._calls > self.num_steps else str(self._calls)
            raise RuntimeError(f"{self.label} is set for {self.num_steps} steps (num_steps) but the generation "
                               f"made {made} transformer calls: one per step is needed")

    def before_generation(self, model: nn.Module) -> None:
        self._check_length()
        super().before_generation(model)

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        super()._before_call(module, args, kwargs)
        if self._calls > self.num_steps:
            self._check_length()
        return None


class DiffusersFasterCache(DiffusersCachePeer):
    """diffusers' FasterCache with its (the paper's) default settings.

    It never skips a step: in some steps it runs the transformer on the conditional half of the CFG batch only
    and rebuilds the unconditional output from frequency-domain deltas of the last full step (CFG-Cache), and it
    replaces every other self-attention in those steps by an extrapolation of the last two. diffusers assumes the
    batch is ``[uncond, cond]`` and splits only the inputs it names; DiT batches ``[cond, uncond]`` and needs
    ``class_labels`` split too, so the peer reorders the batch around each call and adds ``class_labels``.

    Its ``nfc`` is NaN: every step runs the blocks (some on half the batch), so NFC does not describe it; the
    bench's FLOPs ratio does.
    """

    def __init__(self, label: str = "diffusers FasterCache (defaults)") -> None:
        super().__init__(label, self._apply_faster)
        self._null: int | None = None
        self._swapped = False

    def _apply_faster(self, model: nn.Module) -> None:
        self._null = int(model.config.num_embeds_ada_norm)
        defaults = FasterCacheConfig._unconditional_conditional_input_kwargs_identifiers
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
            unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 641),
            low_frequency_weight_update_timestep_range=(99, 901), high_frequency_weight_update_timestep_range=(-1, 301),
            alpha_low_frequency=1.1, alpha_high_frequency=1.1,
            attention_weight_callback=lambda _: 0.5,  # diffusers' default weight, given to silence its warning
            tensor_format="BCHW", current_timestep_callback=lambda: self._timestep,
            _unconditional_conditional_input_kwargs_identifiers=[*defaults, "class_labels"],
        )
        apply_faster_cache(model, config)

    def nfc(self, model: nn.Module) -> float:
        return math.nan

    def _before_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        super()._before_call(module, args, kwargs)
        labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
        if not isinstance(labels, torch.Tensor) or labels.numel() % 2:
            raise ValueError(f"{self.label} needs class labels of a CFG batch (conditional and null halves)")
        half = labels.numel() // 2
        first_null, second_null = bool((labels[:half] == self._null).all()), bool((labels[half:] == self._null).all())
        if first_null == second_null:
            raise ValueError(f"{self.label} needs CFG batched in one call: one half of the class labels conditional, "
                             f"the other the null class {self._null}")
        self._swapped = second_null  # [cond, uncond] -> diffusers' [uncond, cond]
        if not self._swapped:
            return None
        n = labels.numel()
        args = tuple(_swap_halves(a) if _is_batch(a, n) else a for a in args)
        kwargs = {k: _swap_halves(v) if _is_batch(v, n) else v for k, v in kwargs.items()}
        return args, kwargs

    def _after_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        super()._after_call(module, args, kwargs, output)
        if not self._swapped:
            return None
        if isinstance(output, tuple):
            return (_swap_halves(output[0]), *output[1:])
        output.sample = _swap_halves(output.sample)
        return output


def _is_batch(x: Any, n: int) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2)
    return torch.cat([b, a])


# -- cache-dit --------------------------------------------------------------------------------------------
class CacheDiTPeer(_CountingPeer):
    """cache-dit's DBCache on a bare DiT (cache-dit's transformer-only mode, its registered DiT adapter).

    The first ``fn_blocks`` blocks always compute; when their residual changed less than ``threshold`` since the
    last full step, the remaining blocks are skipped and their residual reused (forecast by a TaylorSeer
    calibrator of order ``taylorseer_order``, 0 for none). The context is rebuilt before every generation, so no
    step count is needed.
    """

    def __init__(self, label: str, threshold: float, warmup: int = CACHE_DIT_WARMUP, fn_blocks: int = CACHE_DIT_FN,
                 bn_blocks: int = CACHE_DIT_BN, taylorseer_order: int = CACHE_DIT_TAYLOR_ORDER) -> None:
        super().__init__(label)
        self.threshold, self.warmup, self.fn_blocks, self.bn_blocks = threshold, warmup, fn_blocks, bn_blocks
        self.taylorseer_order = taylorseer_order

    def _configs(self) -> dict[str, Any]:
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        configs: dict[str, Any] = {"cache_config": DBCacheConfig(
            Fn_compute_blocks=self.fn_blocks, Bn_compute_blocks=self.bn_blocks, residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup, enable_separate_cfg=False,
        )}
        if self.taylorseer_order:
            configs["calibrator_config"] = TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        return configs

    def _apply(self, model: nn.Module) -> None:
        import cache_dit

        with _quiet("cache_dit", "CACHE_DIT"):
            cache_dit.enable_cache(model, **self._configs())

    def _reset(self, model: nn.Module) -> None:
        import cache_dit

        with _quiet("cache_dit", "CACHE_DIT"):
            cache_dit.refresh_context(model, **copy.deepcopy(self._configs()))

    def _remove(self, model: nn.Module) -> None:
        import cache_dit

        with _quiet("cache_dit", "CACHE_DIT"):
            cache_dit.disable_cache(model)


def cache_dit_unavailable() -> str | None:
    """Why cache-dit cannot run here, or None when it can."""
    try:
        import cache_dit  # noqa: F401
    except ImportError as exc:
        return (f"cache-dit is not installed ({exc}); `pip install --no-deps cache-dit` (1.5.3 needs nothing "
                "else beyond relcache's own dependencies and transformers)")
    except Exception as exc:  # installed but broken against this torch/diffusers
        return f"cache-dit fails to import: {type(exc).__name__}: {exc}"
    return None


# -- the rows ---------------------------------------------------------------------------------------------
def peer_methods(budgets: Sequence[int] = DEFAULT_BUDGETS, *, num_steps: int = 50, guidance_scale: float = 1.5,
                 sampler: Sampler | None = None) -> list[BenchMethod]:
    """Bench rows of the peers at each budget (NFC of 50 steps), plus FasterCache once (it has no budget).

    ``num_steps``/``guidance_scale``/``sampler`` are the bench's (MagCache indexes its ratios by step and
    calibrates them with ``sampler``, default ``sample_digits``).
    """
    no_cache_dit = cache_dit_unavailable()
    rows = []
    for nfc in budgets:
        if nfc not in INTERVAL_FOR_NFC:
            raise ValueError(f"budgets must be among {sorted(INTERVAL_FOR_NFC)} (NFC of 50 steps), got {nfc}")
        interval, warmup = TAYLORSEER_SCHEDULE[nfc]
        fbc = REFERENCE_THRESHOLDS["fbcache"][nfc]
        mag = REFERENCE_THRESHOLDS["magcache"][nfc]
        dbc = REFERENCE_THRESHOLDS["cache_dit"][nfc]
        label = f"diffusers TaylorSeer N={interval} w={warmup} m=2"
        rows.append(BenchMethod(label, peer=diffusers_taylorseer(label, interval, warmup, order=2), budget=nfc))
        label = f"diffusers FBCache NFC~{nfc} t={fbc:g}"
        rows.append(BenchMethod(label, peer=diffusers_first_block_cache(label, fbc), budget=nfc))
        label = f"diffusers MagCache NFC~{nfc} t={mag:g} K={MAG_MAX_SKIP[nfc]}"
        rows.append(BenchMethod(label, peer=DiffusersMagCache(
            label, mag, MAG_MAX_SKIP[nfc], num_steps=num_steps, sampler=sampler, guidance_scale=guidance_scale,
        ), budget=nfc))
        label = f"cache-dit DBCache F1B0+TS1 NFC~{nfc} t={dbc:g}"
        if no_cache_dit is None:
            rows.append(BenchMethod(label, peer=CacheDiTPeer(label, dbc), budget=nfc))
        else:
            rows.append(BenchMethod(label, unavailable=no_cache_dit, budget=nfc))
    rows.append(BenchMethod("diffusers FasterCache (defaults)", peer=DiffusersFasterCache()))
    return rows


# -- threshold calibration --------------------------------------------------------------------------------
def measure_nfc(model: nn.Module, peer: Peer, sampler: Sampler, *, num_steps: int = 50, guidance_scale: float = 1.5,
                batches: int = 1, batch_size: int = 10, num_classes: int = 10) -> float:
    """Mean realized NFC of ``peer`` over ``batches`` bench-like batches (seeds 0, 1, ...)."""
    labels = torch.arange(batch_size) % num_classes
    peer.attach(model)
    try:
        values = []
        for seed in range(batches):
            peer.before_generation(model)
            sampler(model, labels, num_steps=num_steps, guidance_scale=guidance_scale,
                    generator=torch.Generator().manual_seed(seed))
            values.append(peer.nfc(model))  # type: ignore[attr-defined]
    finally:
        peer.detach(model)
    return sum(values) / len(values)


def calibrate_thresholds(model: nn.Module, make_peer: Callable[[float], Peer], targets: Sequence[float],
                         sampler: Sampler, *, low: float = 3e-3, high: float = 3.0, tolerance: float = 0.05,
                         **kwargs: Any) -> dict[float, tuple[float, float]]:
    """target NFC -> (threshold, realized NFC): for each target, bisection (in log space, down to ``tolerance``
    relative width) for the threshold whose NFC is closest, sharing all measurements between targets.

    NFC falls as the threshold grows; thresholds are rounded to 3 significant digits. ``kwargs`` go to
    :func:`measure_nfc`.
    """
    tried: dict[float, float] = {}

    def nfc_at(t: float) -> float:
        t = float(f"{t:.3g}")
        if t not in tried:
            tried[t] = measure_nfc(model, make_peer(t), sampler, **kwargs)
        return tried[t]

    found = {}
    for target in targets:
        lo, hi = math.log(low), math.log(high)
        for t, n in tried.items():  # what earlier targets measured narrows the bracket
            if n > target:
                lo = max(lo, math.log(t))
            else:
                hi = min(hi, math.log(t))
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            if nfc_at(math.exp(mid)) > target:
                lo = mid
            else:
                hi = mid
        best = min(tried, key=lambda t: (abs(tried[t] - target), t))
        found[target] = (best, tried[best])
    return found


def _main() -> None:
    """Print the thresholds of ``REFERENCE_THRESHOLDS`` for the shipped reference model (one thread: several
    minutes on a busy 2-core CPU)."""
    from .reference import load_reference_transformer, sample_digits

    torch.set_num_threads(1)
    model = load_reference_transformer()
    budgets = list(DEFAULT_BUDGETS)
    found: dict[str, dict[int, float]] = {}

    def report(name: str, results: dict[float, tuple[float, float]]) -> None:
        for nfc, (threshold, realized) in results.items():
            found.setdefault(name, {})[int(nfc)] = threshold
            print(f"{name} NFC {nfc}: threshold {threshold:g} -> realized NFC {realized:.1f}", flush=True)

    report("fbcache", calibrate_thresholds(model, lambda t: diffusers_first_block_cache("FBCache", t), budgets,
                                           sample_digits))
    for nfc in budgets:  # MagCache's cap K depends on the budget: one search each
        report("magcache", calibrate_thresholds(model, lambda t, k=MAG_MAX_SKIP[nfc]: DiffusersMagCache(
            "MagCache", t, k), [nfc], sample_digits))
    if cache_dit_unavailable() is None:
        report("cache_dit", calibrate_thresholds(model, lambda t: CacheDiTPeer("DBCache", t), budgets, sample_digits))
    print(found)


if __name__ == "__main__":
    _main()
