"""More of the stats' rules (``relcache.runtime.stats``) against hand-computed values: why FLOPs are unknown is
carried by ``combine``, ``with_peaks`` pools the contexts' peaks by module kind, and ``print(stats)`` shows the lines
that belong to it (one context: none per context; experts; the tables kept between generations)."""

import dataclasses

from relcache import ContextStats
from relcache.runtime.stats import combine, with_peaks

MODULES = {"blocks.0.attn": "attn", "blocks.0.ff": "mlp"}


def _context(name: str, **fields) -> ContextStats:
    base = dict(name=name, num_steps=10, full_steps=[0, 1, 5], nfc=3, flops_fraction=0.3, executed_flops=30.0,
                full_flops=100.0, model_flops_fraction=0.25, model_executed_flops=50.0, model_full_flops=200.0)
    return ContextStats(**{**base, **fields})


def test_combine_carries_why_flops_are_unknown_for_one_context_and_several():
    for per in ({"cond": _context("cond")}, {"cond": _context("cond"), "uncond": _context("uncond")}):
        assert combine("m", per, 0, MODULES, flops_unknown="FLOP counting is turned off").flops_unknown == (
            "FLOP counting is turned off")
        assert combine("m", per, 0, MODULES).flops_unknown is None


def test_with_peaks_sums_the_contexts_peaks_and_their_modules_bytes_by_kind():
    """cond: attn 100 + mlp 40 (peak 150), uncond: attn 30 and a module not in ``modules`` 5 (peak 60): the peak is
    150 + 60, attn 100 + 30, mlp 40, and the unknown module under "?"."""
    per = {"cond": _context("cond", peak_cache_bytes=150, peak_module_bytes={"blocks.0.attn": 100, "blocks.0.ff": 40}),
           "uncond": _context("uncond", peak_cache_bytes=60, peak_module_bytes={"blocks.0.attn": 30, "x": 5})}
    st = with_peaks(combine("m", per, 0, MODULES))
    assert st.peak_cache_bytes == 210
    assert st.peak_cache_bytes_by_kind == {"attn": 130, "mlp": 40, "?": 5}


def test_printed_stats_of_one_context_with_experts_and_kept_tables():
    """One context: no per-context line; no storage label where the context held tensors as computed (""); the
    tables kept between generations (1.5 MiB) and each expert's NFC on lines of their own."""
    st = combine("FORA(N=2)", {"cond": _context("cond")}, 0, MODULES)
    expert = combine("FORA(N=2)", {"cond": _context("cond", nfc=2, full_steps=[0, 5], num_steps=6)}, 0, MODULES)
    st = dataclasses.replace(st, peak_cache_bytes=2**20, buffer_bytes=3 * 2**19,
                             experts={"transformer": expert, "transformer_2": st})
    assert str(st).splitlines() == [
        "FORA(N=2): NFC 3 of 10 steps, full at [0, 1, 5]",
        "  FLOPs: 30.0% of full computation in the cached modules, 25.0% in the whole transformer",
        "  caches: peak 1.0 MiB, 2 cached modules; 1.5 MiB kept between generations",
        "  expert 'transformer': NFC 2 of 6",
        "  expert 'transformer_2': NFC 3 of 10"]
