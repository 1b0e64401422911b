"""Other libraries' caches on the same model: the extra rows of ``relcache bench --peers``.

One module per library: ``diffusers`` (TaylorSeer, First-Block Cache, MagCache and FasterCache hooks) and
``cache_dit`` (DBCache, optional). ``base`` holds what they share: a snapshot whose ``restore`` removes every hook
and attribute the library added, so ``detach`` leaves the model exactly as before, and an honest NFC count (a
forward hook on the last ``Linear`` of the last block's feed-forward records the timesteps at which that layer
really ran: ``nfc(model)``). ``rows`` turns budgets into bench rows; ``calibrate`` found their thresholds.

The peers assume one transformer call per denoising step (CFG batched, as ``sample_digits`` does); MagCache
checks it.
"""

from ..bench import Peer, Sampler
from .base import CONTEXT, CountingPeer, ModelState
from .cache_dit import CacheDiTPeer, cache_dit_unavailable
from .calibrate import calibrate_thresholds, measure_nfc
from .diffusers import (
    MAG_RETAINED_STEPS,
    DiffusersCachePeer,
    DiffusersFasterCache,
    DiffusersMagCache,
    calibrate_mag_ratios,
    diffusers_first_block_cache,
    diffusers_taylorseer,
)
from .rows import MAG_MAX_SKIP, REFERENCE_THRESHOLDS, TAYLORSEER_SCHEDULE, peer_methods

__all__ = [
    "CONTEXT", "MAG_MAX_SKIP", "MAG_RETAINED_STEPS", "REFERENCE_THRESHOLDS", "TAYLORSEER_SCHEDULE", "CacheDiTPeer",
    "CountingPeer", "DiffusersCachePeer", "DiffusersFasterCache", "DiffusersMagCache", "ModelState", "Peer", "Sampler",
    "cache_dit_unavailable", "calibrate_mag_ratios", "calibrate_thresholds", "diffusers_first_block_cache",
    "diffusers_taylorseer", "measure_nfc", "peer_methods",
]
