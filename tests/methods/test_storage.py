"""Cache storage formats (docs/spec.md, §Cache storage): scaled narrow floats, 4-bit integers, their byte counts."""

import pytest
import torch

from relcache import CacheConfig, CacheStorage, ConfigError, Interval, Linear, Relational, Reuse, Taylor
from relcache.methods.plus import RelationalPlus
from relcache.methods.storage import held_bytes, load, store, stored_bytes

F8 = torch.float8_e4m3fn


def test_float16_cache_keeps_values_past_float16_range():
    """Issue 16 item 4: a float16 cache turned outputs past 65504 into inf (and the image into NaN). Stored with a
    power-of-two scale, 2.3e5 comes back within float16's rounding, and the forecast stays finite."""
    for pred in (Reuse(), Taylor(2), Relational(2)):
        state = pred.new_state(torch.float16)
        outs = [torch.full((1, 4, 8), 2.3e5) * (1 + 0.01 * s) for s in range(3)]
        for s, o in enumerate(outs):
            pred.update(state, 2 * s, o + torch.arange(8.0), o)
        got = pred.predict(state, 5, 10, outs[-1] + 1.0)
        assert torch.isfinite(got).all(), type(pred).__name__
        assert torch.allclose(state.out.base(torch.float32), outs[-1], rtol=2**-11, atol=0)


def test_scaled_float8_is_exact_where_the_values_fit_its_mantissa():
    # amax 1792 -> scale 4 -> 448 (e4m3's largest); 3/4, -3/8 and 1/16 after the scale: all exact in e4m3
    x = torch.tensor([[[3.0, -1.5, 1792.0, 0.25]]])
    held = store(x, F8, "sample")
    assert float(held.scale.reshape(())) == 4.0
    assert torch.equal(load(held, torch.float32), x)
    # a sample of zeros, and a NaN sample, leave the other sample alone (per-sample scales)
    two = torch.stack([x[0], torch.zeros(1, 4)])
    assert torch.equal(load(store(two, F8, "sample"), torch.float32), two)
    bad = torch.stack([x[0], torch.full((1, 4), float("nan"))])
    back = load(store(bad, F8, "sample"), torch.float32)
    assert torch.equal(back[0], x[0]) and back[1].isnan().all()


def test_int4_packs_two_values_per_byte_and_rounds_to_the_scale():
    x = torch.tensor([[7.0, -7.0, 3.0, -1.0, 0.0, 2.0]])  # amax 7: scale 1
    held = store(x, "int4", "token")
    assert held.data.dtype == torch.int8 and held.data.shape == (1, 3)
    assert torch.equal(load(held, torch.float32), x)
    # amax 14 -> scale 2: 5 / 2 = 2.5 rounds (half to even) to 2 -> 4; an odd last dim is held one value a byte
    y = torch.tensor([[14.0, 5.0, -3.0]])
    assert torch.equal(load(store(y, "int4", "token"), torch.float32), torch.tensor([[14.0, 4.0, -4.0]]))


def test_int8_holds_a_uniform_grid_per_scale():
    # token 0: amax 254 -> scale 2 (the smallest power of two with 254 / s <= 127); 3 / 2 = 1.5 rounds (half to even)
    # to 2 -> 4, 0.5 / 2 -> 0. Token 1: amax 1 -> 1/64 (1/128 would put 1 at 128): every value reads back exactly
    x = torch.tensor([[254.0, -100.0, 3.0, 0.5], [1.0, -0.5, 0.25, 0.0]])
    held = store(x, "int8", "token")
    assert held.data.dtype == torch.int8 and held.data.shape == x.shape and held_bytes(held) == 8 + 2 * 4
    assert held.scale.flatten().tolist() == [2.0, 2.0**-6]
    assert held.data.tolist() == [[127, -50, 2, 0], [64, -32, 16, 0]]
    want = torch.tensor([[254.0, -100.0, 4.0, 0.0], [1.0, -0.5, 0.25, 0.0]])
    assert torch.equal(load(held, torch.float32), want)


@pytest.mark.parametrize("fmt", [None, torch.bfloat16, torch.float16, F8, torch.float8_e5m2, "int8", "int4"])
@pytest.mark.parametrize("axes", ["sample", "token", "channel"])
def test_stored_bytes_counts_what_store_holds(fmt, axes):
    for shape in [(2, 6, 8), (3, 5), (1, 2, 3, 7)]:
        x = torch.randn(shape)
        assert held_bytes(store(x, fmt, axes)) == stored_bytes(shape, fmt, axes, x.dtype), shape


@pytest.mark.parametrize("storage", [None, CacheStorage(torch.bfloat16, torch.bfloat16, torch.bfloat16),
                                     CacheStorage(F8, "int4", F8), CacheStorage(None, F8, torch.float16, "channel")])
def test_state_bytes_equals_a_full_state(storage):
    plus = (RelationalPlus(2), RelationalPlus(2, ratio="mean"), RelationalPlus(3, newton=False, ratio="latest"))
    for pred in (Reuse(), Taylor(2), Relational(3), Linear(0.5), *plus):
        state = pred.new_state(storage)
        for s in range(5):
            pred.update(state, s, torch.randn(2, 6, 4), torch.randn(2, 6, 8))
        assert state.nbytes == pred.state_bytes((2, 6, 8), (2, 6, 4), torch.float32, storage), type(pred)


def test_default_and_bfloat16_storage_hold_what_they_held_before():
    """``cache_dtype`` None keeps the computed tensors themselves; a wide dtype is a plain cast (no scale)."""
    x = torch.randn(2, 3, 4)
    assert store(x, None, "token") is x
    assert torch.equal(store(x, torch.bfloat16, "token"), x.to(torch.bfloat16))
    # float16 within its normal range: the power-of-two scale changes no value read back
    y = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(0)) * 10
    y = torch.where(y.abs() < 1e-3, torch.ones_like(y), y)
    assert torch.equal(load(store(y, torch.float16, "token"), torch.float32), y.half().float())


def test_storage_and_budget_arguments_are_checked():
    with pytest.raises(ConfigError, match="cache_dtype"):
        CacheConfig(Reuse(), Interval(), cache_dtype=torch.int8)
    with pytest.raises(ConfigError, match="scale"):
        CacheStorage(F8, F8, F8, scale="row")
    with pytest.raises(ConfigError, match="diffs"):
        CacheStorage(None, "int2")
    for bad in (-1, 0, 1.5, "8"):  # 0 fits no method: refused here, not at the first call
        with pytest.raises(ConfigError, match=r"max_cache_bytes must be an integer >= 1 \(bytes\) or None, got"):
            CacheConfig(Reuse(), Interval(), max_cache_bytes=bad)
    with pytest.raises(ConfigError, match="not both"):
        CacheConfig(Reuse(), Interval(), cache_dtype=F8, max_cache_bytes=10)
    assert CacheConfig(Reuse(), Interval(), max_cache_bytes=10).max_cache_bytes == 10
    # no sign (float8_e8m0fnu read [1.5, -2] back as [2, 2]) or two values a byte (float4 failed at the first record)
    for fmt in (torch.float8_e8m0fnu, torch.float4_e2m1fn_x2):
        with pytest.raises(ConfigError, match="cache_dtype must be None, 'int8', 'int4' or one of .*float8_e4m3fn.*"
                           ", or a relcache.CacheStorage, got"):
            CacheConfig(Reuse(), Interval(), cache_dtype=fmt)
    assert CacheConfig(Reuse(), Interval(), cache_dtype=CacheStorage(F8, "int4", None)).storage.diffs == "int4"


def test_an_input_is_shared_only_while_it_is_provably_the_same_tensor():
    """RFE's stored input is shared between states that store the same tensor object, unchanged (same version) and
    at the same view; an in-place write, another view, an inference tensor or another format each get their own copy,
    and the shared copy counts once (in its owner's bytes)."""
    pred = Relational(2)
    storage = CacheStorage(F8, "int4", F8)
    x = torch.randn(1, 4, 8)
    a, b, c = (pred.new_state(storage) for _ in range(3))
    pred.update(a, 0, x, torch.randn(1, 4, 8))
    pred.update(b, 0, x, torch.randn(1, 4, 16))
    assert b.inp is a.inp and b.owner is a
    one = held_bytes(a.inp)
    assert a.nbytes == a.out.nbytes + one + held_bytes(a.ratio)  # the owner counts the input
    assert b.nbytes == b.out.nbytes + held_bytes(b.ratio)  # the other state does not
    x.mul_(1.0)  # an in-place write (even one that changes no value) bumps the version: no longer provably the same
    pred.update(c, 0, x, torch.randn(1, 4, 8))
    assert c.inp is not a.inp and c.owner is None
    v = torch.randn(2, 4, 8)
    d, e = pred.new_state(storage), pred.new_state(storage)
    pred.update(d, 0, v[0:1], torch.randn(1, 4, 8))
    pred.update(e, 0, v[0:1], torch.randn(1, 4, 8))  # another view object of the same rows: shared
    assert e.inp is d.inp
    pred.update(e, 1, v[1:2], torch.randn(1, 4, 8))  # other rows: not shared
    assert e.inp is not d.inp and e.owner is None
    f = pred.new_state(CacheStorage(F8, "int4", torch.bfloat16))
    pred.update(f, 0, v[0:1], torch.randn(1, 4, 8))  # another input format: its own copy
    assert f.owner is None
    with torch.inference_mode():
        y = torch.randn(1, 4, 8)
    g, h = pred.new_state(storage), pred.new_state(storage)
    pred.update(g, 0, y, torch.randn(1, 4, 8))
    pred.update(h, 0, y, torch.randn(1, 4, 8))
    assert h.inp is not g.inp


def test_shared_inputs_hold_no_tensor_and_forget_freed_ones():
    from relcache.methods.storage import SharedInputs

    pool, pred = SharedInputs(), Relational(1)
    owner = pred.new_state(F8)
    x = torch.randn(1, 4, 8)
    held = store(x, F8, "token")
    pool.add(x, F8, "token", held, owner)
    assert len(pool) == 1 and pool.find(x, F8, "token") == (held, owner)
    assert pool.find(x, F8, "sample") is None and pool.find(x.clone(), F8, "token") is None
    del held
    assert pool.find(x, F8, "token") is None  # its stored copy is gone: nothing to share
    del x
    assert len(pool) == 0  # the base tensor is freed: its entry goes


def test_state_bytes_of_a_shared_input_leave_the_input_out():
    pred, storage = Relational(2), CacheStorage(F8, "int4", F8)
    full = pred.state_bytes((2, 6, 8), (2, 6, 4), torch.float32, storage)
    shared = pred.state_bytes((2, 6, 8), (2, 6, 4), torch.float32, storage, input_shared=True)
    assert full - shared == 2 * 6 * 4 + 4 * 2 * 6  # float8 values and one float32 scale per token


@pytest.mark.parametrize("fmt", [F8, "int8", "int4"])
def test_scaled_storage_reads_back_into_float16_as_a_cast_of_the_float32_read(fmt):
    """Values near 1e-3 in a float16 model read back as a plain cast of the float32 read gives them (the scale fits
    float16 there); a token under float16's normal range may read back as 0 (docs/spec.md, §Cache storage)."""
    x = (torch.tensor([[[1.0, -0.5, 0.25, 1.0]]]) * 1e-3).half()
    held = store(x, fmt, "token")
    back = load(held, torch.float16)
    assert torch.equal(back, load(held, torch.float32).half()) and (back != 0).all()


def test_a_format_that_is_the_computed_dtype_holds_the_tensor_as_computed():
    """float16 storage of a float16 model: nothing to fit, so no scale. Scaled to float16's top (2**-26 for a token
    near 1e-3) and multiplied back in float16, every value read back as 0 (found by review), at more bytes."""
    x = torch.randn(2, 6, 8).half() * 1e-3
    assert store(x, torch.float16, "token") is x and torch.equal(load(store(x, torch.float16, "token"), x.dtype), x)
    assert stored_bytes((2, 6, 8), torch.float16, "token", torch.float16) == x.numel() * 2
    assert stored_bytes((2, 6, 8), torch.float16, "token", torch.float32) == x.numel() * 2 + 2 * 6 * 4


@pytest.mark.parametrize("fmt,top", [("int8", 127), ("int4", 7)])
def test_channel_scale_is_per_sample_and_channel_across_very_different_samples(fmt, top):
    """Per-channel scales are one per (sample, channel): a sample 2**20 times smaller than the other, and channels
    2**7 apart, each get the power of two that fits their own largest magnitude, so every value reads back within
    half of its own (sample, channel) scale. A scale shared across samples (or over another dim) rounds the small
    sample's or channel's values to 0."""
    # scale exponents p[b, c]; the largest magnitude of each (sample, channel) is top * 2**p (at token 0), so the
    # smallest power of two s with amax / s <= top is exactly 2**p
    p = torch.tensor([[-10.0, -17.0, -3.0, -10.0], [10.0, 3.0, 17.0, 10.0]])
    scale = torch.exp2(p)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, 5, 4, generator=g) * 1.8 - 0.9) * top * scale[:, None, :]
    x[:, 0, :] = top * scale * torch.tensor([1.0, -1.0, 1.0, -1.0])
    held = store(x, fmt, "channel")
    assert held.scale.shape == (2, 1, 4) and torch.equal(held.scale.reshape(2, 4), scale)
    err = (load(held, torch.float32) - x).abs()
    assert (err <= scale[:, None, :] / 2).all(), (err / scale[:, None, :]).amax()
    # and per sample ("sample" axes): one scale per sample, the largest exponent of its channels
    held = store(x, fmt, "sample")
    assert torch.equal(held.scale.reshape(2), torch.exp2(torch.tensor([-3.0, 17.0])))
    err = (load(held, torch.float32) - x).abs()
    assert (err <= held.scale / 2).all()


class _Norms(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the vector norms the operations inside it run."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten.linalg_vector_norm.default
        return func(*args, **(kwargs or {}))


def test_a_state_sharing_an_input_takes_its_owners_input_change_norm():
    """Where two states read one tensor (FLUX's single blocks), the second takes the norm of ``I(i) - I(a)`` its
    owner measured, at records (the ratio's denominator) and forecasts alike: one norm fewer each, forecasts
    bit-identical to unshared states, and never across an in-place write, another tensor or another stored input."""
    pred = Relational(2)
    torch.manual_seed(0)
    xs = [torch.randn(2, 4, 8) for _ in range(4)]
    outs = [(torch.randn(2, 4, 8), torch.randn(2, 4, 16)) for _ in range(3)]

    def run(share: bool, poke: bool = False) -> tuple[list[torch.Tensor], int]:
        a, b = pred.new_state(None), pred.new_state(None)
        got, count = [], _Norms()
        with count:
            for step, (x, (oa, ob)) in enumerate(zip(xs[:3], outs, strict=True)):
                x = x.clone()
                pred.update(a, 2 * step, x, oa)
                pred.update(b, 2 * step, x if share else x.clone(), ob)
            x = xs[3].clone()
            got.append(pred.predict(a, 5, 10, x))
            if poke:
                x.add_(1.0)  # an in-place write between the two forecasts: the owner's norm no longer applies
            got.append(pred.predict(b, 5, 10, x if share else x.clone()))
        assert (b.owner is a) == share
        return got, count.n

    shared, n_shared = run(True)
    alone, n_alone = run(False)
    for s, u in zip(shared, alone, strict=True):
        assert torch.equal(s, u)
    # per state: the ratio's two norms at the 2nd and 3rd records, the input change's and the direction's at the
    # forecast; the sharing state measures no input change (two records, one forecast)
    assert n_alone == 2 * (2 * 2 + 2) and n_shared == n_alone - 3
    poked, n_poked = run(True, poke=True)
    poked_alone, _ = run(False, poke=True)
    assert n_poked == n_shared + 1  # the written tensor is measured again
    assert torch.equal(poked[1], poked_alone[1]) and not torch.equal(poked[1], shared[1])
    # the owner records once more alone: its norms are then against a newer stored input than the other state's
    a, b, c = (pred.new_state(None) for _ in range(3))
    for step, (x, (oa, ob)) in enumerate(zip(xs[:2], outs[:2], strict=True)):
        for state, o in ((a, oa), (b, ob), (c, ob)):
            pred.update(state, 2 * step, x, o)
    pred.update(a, 4, xs[2], outs[2][0])
    pred.predict(a, 5, 10, xs[3])
    assert b.owner is a and torch.equal(pred.predict(b, 5, 10, xs[3]), pred.predict(c, 5, 10, xs[3].clone()))
    # a norm autograd recorded is not kept: it would hold its graph (and the input) past the step
    x = xs[3].clone().requires_grad_()
    pred.predict(a, 5, 10, x)
    assert a.led and a.moved is None
