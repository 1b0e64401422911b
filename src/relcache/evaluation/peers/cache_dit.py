"""cache-dit's DBCache as a peer. cache-dit is optional: without it, ``cache_dit_unavailable`` says why and the
bench shows its rows with that note."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .base import CountingPeer, quiet

__all__ = [
    "CACHE_DIT_BN", "CACHE_DIT_FN", "CACHE_DIT_TAYLOR_ORDER", "CACHE_DIT_WARMUP", "CacheDiTPeer",
    "cache_dit_unavailable",
]

#: cache-dit DBCache settings: F1B0 (only the first block always computes; cache-dit's First-Block-Cache-like
#: setting, so skipped steps skip all other blocks), TaylorSeer calibrator of order 1 (cache-dit's recommended
#: pairing), warm-up 2 steps.
CACHE_DIT_FN, CACHE_DIT_BN, CACHE_DIT_WARMUP, CACHE_DIT_TAYLOR_ORDER = 1, 0, 2, 1

_LOGGERS = ("cache_dit", "CACHE_DIT")


class CacheDiTPeer(CountingPeer):
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

        with quiet(*_LOGGERS):
            cache_dit.enable_cache(model, **self._configs())

    def _reset(self, model: nn.Module) -> None:
        import cache_dit

        with quiet(*_LOGGERS):
            cache_dit.refresh_context(model, **copy.deepcopy(self._configs()))

    def _remove(self, model: nn.Module) -> None:
        import cache_dit

        with quiet(*_LOGGERS):
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
