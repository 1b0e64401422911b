"""FLOP counting with ``torch.utils.flop_counter``, plus the CPU attention kernel it does not know.

On CPU, ``scaled_dot_product_attention`` lowers to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which torch's registry lacks, so attention's ``QK^T`` and ``AV`` would count as zero. We register it
with torch's own SDPA formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA: dict[Any, Any] = {}
_cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _cpu_sdpa is not None:
    _EXTRA[_cpu_sdpa] = _cpu_sdpa_flops


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention; use as a context manager."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA)
