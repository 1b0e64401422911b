"""runtime/budget.py: a memory budget's storage choice and its error, and modules cast after ``enable``. Each test
fails on a hand-made mutation of that file (named in its docstring) that the rest of the suite let pass."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import dit_inputs, run_loop, tiny_dit

import relcache
from relcache import FORA, RFC, ConfigError


def test_a_budget_nothing_fits_names_the_smallest_need_and_the_as_computed_bytes():
    """Guards the message of ``choose_storage`` (mutant: both numbers taken from the last rung). FORA's Reuse holds
    O(a) per module; DiT has 6 cached modules of output (2, 16, 32) float32: as computed 6 * 4096 = 24576 bytes; the
    last rung (int8 base) 6 * (2*16*32 bytes + 2*16 float32 per-token scales) = 6 * 1152 = 6912 bytes."""
    model = tiny_dit()
    x, y = dit_inputs()
    relcache.enable(model, dataclasses.replace(FORA(3), max_cache_bytes=1000))
    try:
        with pytest.raises(ConfigError) as err:
            run_loop(model, x, y, steps=2)
    finally:
        relcache.disable(model)
    assert "needs 6912 bytes (0.00 GiB), caches as computed 24576 bytes" in str(err.value)


def test_cached_modules_cast_after_enable_are_sized_again():
    """Guards the budget's memo key (mutant: the cached modules' parameter dtypes left out of it). The cached modules
    alone are cast to float64 after a generation (inputs cast in, outputs cast back, so the call's arguments keep
    their dtype): their states double, and a budget that held them as computed in float32 must now pick another
    storage instead of the remembered "as computed", and stay within the budget."""
    model = tiny_dit()
    x, y = dit_inputs()
    cfg = RFC(threshold=0.0)  # every step full: the histories fill up
    relcache.enable(model, cfg)
    run_loop(model, x, y, steps=5)
    budget = relcache.stats(model).peak_cache_bytes
    relcache.disable(model)
    relcache.enable(model, dataclasses.replace(cfg, max_cache_bytes=budget))
    try:
        run_loop(model, x, y, steps=5)
        assert relcache.stats(model).contexts["default"].cache_storage == "as computed"
        for block in model.transformer_blocks:
            for m in (block.attn1, block.ff):
                m.double()
                m.register_forward_pre_hook(
                    lambda _m, a, kw: (tuple(t.double() if torch.is_tensor(t) else t for t in a),
                                       {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}),
                    with_kwargs=True)
                m.register_forward_hook(lambda _m, _a, out: out.float())
        run_loop(model, x, y, steps=5)
        st = relcache.stats(model)
    finally:
        relcache.disable(model)
    assert st.contexts["default"].cache_storage != "as computed"
    assert st.peak_cache_bytes <= budget
