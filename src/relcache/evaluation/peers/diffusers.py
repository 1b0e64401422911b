"""diffusers' caches as peers: TaylorSeer, First-Block Cache, MagCache and FasterCache hooks on a bare DiT.

``DiTTransformer2DModel`` lacks diffusers' ``CacheMixin`` (no ``enable_cache``), so each peer applies the hooks
itself and supplies what a diffusers pipeline would: a cache context around every transformer call (with step
index and timestep), a state reset before every generation, the current timestep (FasterCache), and the model's
magnitude ratios (MagCache, from diffusers' own calibration mode).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
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

from ..bench import Sampler
from .base import CONTEXT, CountingPeer, quiet

__all__ = [
    "MAG_RETAINED_STEPS", "DiffusersCachePeer", "DiffusersFasterCache", "DiffusersMagCache", "calibrate_mag_ratios",
    "diffusers_first_block_cache", "diffusers_taylorseer",
]

#: MagCache's retention (never skip): the first 2 steps, relcache's warm-up.
MAG_RETAINED_STEPS = 2


class DiffusersCachePeer(CountingPeer):
    """One of diffusers' cache hooks (``apply(model)`` registers them) on a bare transformer.

    Sets a ``CacheContext`` (name, step index, timestep) around every call, as a pipeline's ``cache_context``
    would, and resets the hooks' state before each generation.
    """

    def __init__(self, label: str, apply: Callable[[nn.Module], None]) -> None:
        super().__init__(label)
        self._apply_hooks = apply

    def _apply(self, model: nn.Module) -> None:
        with quiet("diffusers.hooks"):
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
        from ..reference import sample_digits as sampler
    # one step more than the run: diffusers clears (and prints) the ratios after its last step
    config = MagCacheConfig(calibrate=True, num_inference_steps=num_steps + 1)
    peer = DiffusersCachePeer("MagCache calibration", lambda m: apply_mag_cache(m, config))
    labels = torch.arange(num_samples) % int(model.config.num_embeds_ada_norm)
    peer.attach(model)
    try:
        peer.before_generation(model)
        sampler(model, labels, num_steps=num_steps, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed))
        heads = [m._diffusers_hook.get_hook(name) for m, name in peer.added_hooks()]
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
