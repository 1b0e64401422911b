"""runtime/budget.py: a memory budget's storage choice and its error, modules cast after ``enable``, and a call
context that finds too little left. Tests from a mutation review name their mutant in their docstring."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import dit_inputs, run_loop, tiny_dit
from families import wan_kwargs, wan_pipe

import relcache
from relcache import FORA, RFC, ConfigError
from relcache.methods.config import STORAGE_LADDER


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
    assert "needs 6912 bytes (6.75 KiB), caches as computed 24576 bytes" in str(err.value)


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


def test_a_context_that_found_too_little_left_is_counted_from_the_next_generation():
    """Split CFG (Wan: "cond", then "uncond"), at a budget that the last rung fits for both contexts. In a session's
    first generation "cond" chooses without knowing of "uncond" and leaves it too little: a ConfigError that says
    so. The next generation counts "uncond" from the start and fits; before, the failed context was never counted
    and every generation failed alike. Later generations choose the same storage: equal outputs."""
    cfg = RFC(target_nfc=3)
    pipe = wan_pipe()

    def run() -> tuple[np.ndarray, relcache.CacheStats]:
        out = pipe(**wan_kwargs(), num_inference_steps=5, generator=torch.manual_seed(0), output_type="np").frames
        return np.asarray(out), relcache.stats(pipe)

    relcache.enable(pipe, dataclasses.replace(cfg, cache_dtype=STORAGE_LADDER[-1]))
    _, smallest = run()
    relcache.disable(pipe)
    budget = smallest.peak_cache_bytes  # both contexts in the last rung
    relcache.enable(pipe, dataclasses.replace(cfg, max_cache_bytes=budget))
    try:
        with pytest.raises(ConfigError, match=r"'uncond' started after the generation's other contexts had chosen"):
            run()
        second, st2 = run()
        third, st3 = run()
    finally:
        relcache.disable(pipe)
    assert {c.cache_storage for c in st2.contexts.values()} == {STORAGE_LADDER[-1].label}
    assert set(st2.contexts) == {"cond", "uncond"} and st2.peak_cache_bytes <= budget
    assert np.array_equal(second, third) and st3.full_steps == st2.full_steps


def test_a_server_mixing_guided_and_unguided_requests_gets_the_same_storage_per_request():
    """Split CFG (Wan) under ``max_cache_bytes``, guided and unguided requests in turn, as a server gets them: each
    kind expects the contexts the latest request of its kind ran, so identical requests choose the same storage and
    give equal outputs whatever came before. Found by review: a guided request after an unguided one was planned as
    if "uncond" did not exist (a ConfigError at a tight budget, another storage and image at a looser one), and an
    unguided request after a guided one counted an "uncond" that never came. Mutant: one set of expected contexts for
    every kind (the latest generation's)."""
    pipe = wan_pipe()

    def run(guidance: float) -> tuple[np.ndarray, dict[str, str]]:
        out = pipe(**{**wan_kwargs(), "guidance_scale": guidance}, num_inference_steps=5,
                   generator=torch.manual_seed(0), output_type="np").frames
        return np.asarray(out), {n: c.cache_storage for n, c in relcache.stats(pipe).contexts.items()}

    relcache.enable(pipe, RFC(target_nfc=3))
    run(5.0)
    one = relcache.stats(pipe).contexts["cond"].peak_cache_bytes  # one context's caches as computed
    relcache.disable(pipe)
    relcache.enable(pipe, dataclasses.replace(RFC(target_nfc=3), max_cache_bytes=int(one * 1.9)))
    try:
        got = {5.0: [], 1.0: []}
        for guidance in (5.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0):
            got[guidance].append(run(guidance))
    finally:
        relcache.disable(pipe)
    # from each kind's second request on (the first knows only the other kind's contexts)
    for guidance, runs in got.items():
        (out, storage), *rest = runs[1:]
        for o, s in rest:
            assert s == storage and np.array_equal(o, out), guidance
    assert set(got[5.0][1][1]) == {"cond", "uncond"} and got[1.0][1][1] == {"cond": "as computed"}
