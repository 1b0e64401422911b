"""Every public constructor, property-based: any invalid value is refused at construction with a ConfigError whose
message names the parameter; any valid value constructs (numpy integers and floats included, stored as int and
float), and the result is hashable and equal to the same config built from plain Python values."""

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import run_loop, tiny_dit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relcache
from relcache import (
    FORA,
    RFC,
    CacheConfig,
    CFGCache,
    ConfigError,
    FasterCache,
    InputError,
    Interval,
    Linear,
    Relational,
    Reuse,
    Taylor,
    TaylorSeer,
)

FAST = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
NOT_NUMBERS = st.one_of(st.text(max_size=3), st.just([1]), st.just((1,)), st.just({}), st.just(object()),
                        st.just(torch.tensor([1, 2])))


# -- values ------------------------------------------------------------------------------------------------------------
def ints(low: int, high: int, tensors: bool = True) -> st.SearchStrategy:
    """Integers in [low, high] as Python, numpy or (``tensors``) one-element integer tensor values."""
    kinds = [int, np.int64, np.int32, np.uint16] + ([torch.tensor] if tensors else [])
    return st.builds(lambda n, kind: kind(n), st.integers(low, high), st.sampled_from(kinds))


def bad_ints(low: int, high: int | None = None, optional: bool = False) -> st.SearchStrategy:
    """Anything check_int refuses: out of range (numpy too), booleans, floats (integral ones included), non-numbers."""
    out = [st.integers(max_value=low - 1), st.integers(-(2**62), low - 1).map(np.int64), st.booleans(),
           st.just(np.bool_(True)), st.floats(allow_nan=True, allow_infinity=True), st.just(torch.tensor(2.0)),
           st.just(torch.tensor(True)), NOT_NUMBERS]
    if high is not None:
        out.append(st.integers(min_value=high + 1))
    if not optional:
        out.append(st.none())
    return st.one_of(out)


def reals(low: float, high: float) -> st.SearchStrategy:
    """Finite numbers in [low, high]: floats, ints, numpy floats, fractions."""
    x = st.floats(low, high, allow_nan=False, allow_infinity=False)
    return st.one_of(x, x.map(np.float64), st.integers(math.ceil(low), math.floor(high)),
                     st.integers(math.ceil(low), math.floor(high)).map(np.int64),
                     st.sampled_from([low, high, (low + high) / 2]).map(np.float32),
                     st.just(Fraction(1, 3)).filter(lambda f: low <= f <= high))


def bad_reals(low: float | None = None, high: float | None = None, optional: bool = False) -> st.SearchStrategy:
    """Anything check_float refuses: NaN and infinities (numpy's too), out of range, booleans, complex, non-numbers."""
    out = [st.sampled_from([math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("inf")]), st.booleans(),
           st.complex_numbers(allow_nan=False, allow_infinity=False).filter(lambda z: z.imag != 0), NOT_NUMBERS]
    if low is not None:
        out.append(st.floats(max_value=low, exclude_max=True, allow_nan=False, allow_infinity=False))
    if high is not None:
        out.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
    if not optional:
        out.append(st.none())
    return st.one_of(out)


BOOLS = st.booleans()
BAD_BOOLS = st.one_of(st.integers(), st.text(max_size=3), st.just(np.bool_(True)), st.just("yes"))
FRACTIONS = reals(0.0, 1.0)
BAD_FRACTIONS = bad_reals(0.0, 1.0)


@st.composite
def windows(draw) -> tuple | list:
    a, b = sorted([draw(FRACTIONS), draw(FRACTIONS)], key=float)  # by value: numpy scalars compare in their dtype
    return draw(st.sampled_from([tuple, list]))([a, b])


BAD_WINDOWS = st.one_of(
    # by value as the check reads them (floats): Fraction(1, 3) is above the float 1/3, but not as a float
    st.tuples(FRACTIONS, FRACTIONS).filter(lambda p: float(p[0]) > float(p[1])),
    st.tuples(BAD_FRACTIONS, FRACTIONS), st.tuples(FRACTIONS, BAD_FRACTIONS),
    st.tuples(FRACTIONS), st.tuples(FRACTIONS, FRACTIONS, FRACTIONS), st.none(), FRACTIONS, st.text(max_size=2),
)


@st.composite
def window_steps(draw) -> tuple | list:
    a, b = sorted([draw(st.integers(0, 60)), draw(st.integers(0, 60))])
    kind = draw(st.sampled_from([int, np.int64]))
    return draw(st.sampled_from([tuple, list]))([kind(a), kind(b)])


BAD_WINDOW_STEPS = st.one_of(
    st.tuples(st.integers(1, 60), st.integers(0, 60)).filter(lambda p: p[0] > p[1]),
    st.tuples(st.integers(max_value=-1), st.integers(0, 60)), st.tuples(st.booleans(), st.integers(1, 60)),
    st.tuples(st.floats(0, 10), st.floats(10, 20)), st.tuples(st.integers(0, 5)), st.integers(0, 5),
    st.text(max_size=2),
)

PREDICTORS = st.one_of(st.just(Reuse()), st.builds(Taylor, st.integers(0, 4)), st.builds(Relational, st.integers(1, 4)),
                       st.builds(Linear, st.sampled_from([0.5, "rising", -1.0])))
SCHEDULES = st.one_of(st.builds(Interval, st.integers(1, 5), st.integers(1, 3)),
                      st.builds(lambda t: InputError(threshold=t), st.floats(0, 2)),
                      st.builds(lambda n: InputError(target_nfc=n), st.integers(2, 10)))
NOT_A_PART = st.one_of(st.none(), st.text(max_size=3), st.integers(),
                       st.sampled_from([Reuse, Interval, Taylor, "attn"]))
MODULE_SETS = st.lists(st.sampled_from(["attn", "cross_attn", "mlp"]), min_size=1, max_size=4)
BAD_MODULES = st.one_of(
    st.just([]), st.just(()), st.sampled_from(["attn", "mlp"]), st.just({"attn"}), st.integers(),
    st.lists(st.text(max_size=4).filter(lambda s: s not in ("attn", "cross_attn", "mlp")), min_size=1, max_size=3),
    st.just(["attn", None]), st.just([["attn"]]),
)
FLOAT_DTYPES = st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32, torch.float64])
BAD_DTYPES = st.sampled_from([torch.int8, torch.int64, torch.bool, torch.complex64, "bfloat16", torch.float32.__class__,
                              np.float16, 16])
WEIGHTS = st.one_of(reals(-10.0, 10.0), st.just("rising"), st.just(lambda i, n: 0.5), st.just(max))
BAD_WEIGHTS = st.one_of(bad_reals(), st.text(max_size=6).filter(lambda s: s != "rising"), st.just("Rising"))

# -- every constructor: (build(**kwargs), kwargs that make a valid base, {parameter: (valid values, invalid values)})
# A parameter tested for invalid values is drawn invalid while every other keeps its base value.
SPECS = {
    "Interval": (Interval, {}, {"interval": (ints(1, 100), bad_ints(1)), "warmup": (ints(1, 100), bad_ints(1))}),
    "InputError(threshold)": (InputError, {"threshold": 0.3}, {
        "threshold": (reals(0.0, 1e6), bad_reals(0.0)),
        "order": (ints(0, 4), bad_ints(0, 4)),
        "warmup": (ints(1, 50), bad_ints(1)),
        "max_skip": (st.one_of(st.none(), ints(1, 50)), bad_ints(1, optional=True)),
    }),
    "InputError(target_nfc)": (InputError, {"target_nfc": 50}, {
        "target_nfc": (ints(50, 500), st.one_of(bad_ints(1, optional=True), st.integers(1, 1))),  # 1 < warmup 2
    }),
    "Reuse": (Reuse, {}, {}),
    # Taylor and Relational check their order but store it as given: a tensor order would hash by identity
    "Taylor": (Taylor, {}, {"order": (ints(0, 4, tensors=False), bad_ints(0, 4))}),
    "Relational": (Relational, {}, {"order": (ints(1, 4, tensors=False), bad_ints(1, 4))}),
    "Linear": (Linear, {}, {"weight": (WEIGHTS, BAD_WEIGHTS)}),
    "CFGCache": (CFGCache, {}, {
        "interval": (ints(1, 100), bad_ints(1)),
        "window": (windows(), BAD_WINDOWS),
        "window_steps": (st.one_of(st.none(), window_steps()), BAD_WINDOW_STEPS),
        "alpha1": (reals(0.0, 10.0), bad_reals(0.0)),
        "alpha2": (reals(0.0, 10.0), bad_reals(0.0)),
        "early": (FRACTIONS, BAD_FRACTIONS),
        "late": (FRACTIONS, BAD_FRACTIONS),
        "radius": (st.one_of(st.none(), ints(1, 64)), bad_ints(1, optional=True)),
        "compound": (BOOLS, BAD_BOOLS),
        "cond_first": (st.one_of(st.none(), BOOLS), BAD_BOOLS),
        "align": (BOOLS, BAD_BOOLS),
    }),
    "CacheConfig": (CacheConfig, {"predictor": Reuse(), "schedule": Interval()}, {
        "predictor": (PREDICTORS, NOT_A_PART),
        "schedule": (SCHEDULES, NOT_A_PART),
        "modules": (st.one_of(st.none(), MODULE_SETS, MODULE_SETS.map(tuple)), BAD_MODULES),
        "cache_dtype": (FLOAT_DTYPES, BAD_DTYPES),
        "name": (st.one_of(st.none(), st.text(max_size=8)), st.one_of(st.integers(), st.just(b"x"), st.just(["a"]))),
        "cfg_cache": (st.one_of(st.none(), st.builds(CFGCache, interval=st.integers(1, 9))),
                      st.one_of(st.text(max_size=2), st.just({"interval": 2}), st.booleans(), st.just(CFGCache))),
    }),
    "FORA": (FORA, {}, {"interval": (ints(1, 100), bad_ints(1)), "warmup": (ints(1, 100), bad_ints(1))}),
    "TaylorSeer": (TaylorSeer, {}, {
        "interval": (ints(1, 100), bad_ints(1)), "order": (ints(0, 4), bad_ints(0, 4)),
        "warmup": (ints(1, 100), bad_ints(1)),
    }),
    "RFC(threshold)": (RFC, {"threshold": 0.3}, {
        "order": (ints(1, 4), bad_ints(1, 4)),
        "threshold": (reals(0.0, 1e6), bad_reals(0.0)),
        "warmup": (ints(1, 50), bad_ints(1)),
        "max_skip": (st.one_of(st.none(), ints(1, 50)), bad_ints(1, optional=True)),
    }),
    "RFC(target_nfc)": (RFC, {"target_nfc": 14}, {
        "target_nfc": (ints(14, 500), st.one_of(bad_ints(1, optional=True), st.integers(1, 1))),
    }),
    "FasterCache": (FasterCache, {}, {
        "interval": (ints(1, 100), bad_ints(1)),
        "warmup": (ints(1, 100), bad_ints(1)),
        "weight": (WEIGHTS, BAD_WEIGHTS),
        "alpha1": (reals(0.0, 10.0), bad_reals(0.0)),
        "alpha2": (reals(0.0, 10.0), bad_reals(0.0)),
        "cfg_interval": (ints(1, 100), bad_ints(1)),
        "cfg_window": (windows(), BAD_WINDOWS),
        "early": (FRACTIONS, BAD_FRACTIONS),
        "late": (FRACTIONS, BAD_FRACTIONS),
        "cfg": (BOOLS, BAD_BOOLS),
        "cfg_align": (BOOLS, BAD_BOOLS),
        "cfg_phase": (st.sampled_from(["window", "step0"]), st.sampled_from(["diffusers", "", 0, None])),
        "cfg_refresh_full": (st.just(False), BAD_BOOLS),
        "compound": (BOOLS, BAD_BOOLS),
    }),
}
PARAMETERS = [(ctor, param) for ctor, (_, _, params) in SPECS.items() for param in params]


def _names(message: str, param: str) -> bool:
    """Whether ``message`` names ``param`` as a word (``interval`` is not named by ``cfg_interval``)."""
    return re.search(rf"(?<![\w]){re.escape(param)}(?![\w])", message) is not None


def _plain(value):
    """The plain Python value of a drawn one (numpy and tensor integers, numpy floats), for comparison."""
    if isinstance(value, torch.Tensor | np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


# -- the properties ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("ctor", "param"), PARAMETERS, ids=[f"{c}.{p}" for c, p in PARAMETERS])
@FAST
@given(data=st.data())
def test_an_invalid_value_is_refused_naming_the_parameter(ctor, param, data):
    build, base, params = SPECS[ctor]
    value = data.draw(params[param][1], label=param)
    with pytest.raises(ConfigError) as err:
        build(**{**base, param: value})
    assert _names(str(err.value), param), str(err.value)


@pytest.mark.parametrize("ctor", list(SPECS))
@FAST
@given(data=st.data())
def test_valid_values_construct(ctor, data):
    build, base, params = SPECS[ctor]
    kwargs = dict(base)
    for param, (valid, _) in params.items():
        if data.draw(st.booleans(), label=f"set {param}"):
            kwargs[param] = data.draw(valid, label=param)
    config = build(**kwargs)
    # equal to, and hashing like, the same config built from plain Python values: numpy values are normalised
    plain = build(**{k: _plain(v) for k, v in kwargs.items()})
    assert config == plain and hash(config) == hash(plain)
    for part in _parts(config):  # schedules, Linear and CFG-Cache store plain ints and floats
        for name, value in vars(part).items():
            assert not isinstance(value, np.generic | torch.Tensor), (type(part).__name__, name, value)
        if isinstance(part, CFGCache):
            assert isinstance(part.window, tuple) and all(type(v) is float for v in part.window)
    if ctor == "CacheConfig" and kwargs.get("modules") is not None:
        assert isinstance(config.modules, tuple) and set(config.modules) == set(kwargs["modules"])


def _parts(config):
    if isinstance(config, CacheConfig):
        return [p for p in (config.predictor, config.schedule, config.cfg_cache) if isinstance(p, Linear | Interval
                | InputError | CFGCache)]
    return [config] if isinstance(config, Linear | Interval | InputError | CFGCache) else []


# -- a few drawn valid configs run on a tiny DiT -----------------------------------------------------------------------
STEPS = 3
RUNNABLE = st.one_of(
    st.builds(FORA, ints(1, 4), ints(1, 3)),
    st.builds(TaylorSeer, ints(1, 4), ints(0, 4), ints(1, 3)),
    st.builds(lambda o, t, w: RFC(order=o, threshold=t, warmup=w), ints(1, 4), reals(0.0, 2.0), ints(1, 2)),
    st.builds(lambda o, n: RFC(order=o, target_nfc=n, warmup=1), ints(1, 4), ints(1, STEPS)),
    st.builds(lambda w, i, c: FasterCache(interval=i, warmup=1, weight=w, cfg=c), WEIGHTS, ints(1, 3), BOOLS),
    st.builds(CacheConfig, PREDICTORS, st.builds(Interval, ints(1, 3), ints(1, 2)),
              st.one_of(st.none(), MODULE_SETS.filter(lambda m: set(m) != {"cross_attn"})), FLOAT_DTYPES),
)


@pytest.fixture(scope="module")
def model():
    return tiny_dit(layers=2)


@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=RUNNABLE)
def test_drawn_valid_configs_run_three_steps(model, config):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 5])
    with relcache.cached(model, config):
        out = run_loop(model, x, y, steps=STEPS)
        assert relcache.stats(model).num_steps == STEPS
    assert len(out) == STEPS and all(o.shape == (2, 4, 8, 8) and torch.isfinite(o).all() for o in out)


# -- the reported cases, by name ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_faster_cache_refuses_a_non_finite_weight(weight):
    """Used to be accepted and give an all-NaN image."""
    with pytest.raises(ConfigError, match=r"weight must be a finite number, 'rising' or a callable"):
        FasterCache(weight=weight)


def test_faster_cache_refuses_a_non_bool_cfg():
    with pytest.raises(ConfigError, match=r"cfg must be True .* or False .*, got 'yes'"):
        FasterCache(cfg="yes")


def test_numpy_integers_are_accepted_and_stored_as_int():
    config = FORA(interval=np.int64(4), warmup=np.int32(2))
    assert config == FORA(4, 2) and type(config.schedule.interval) is int and config.label == "FORA(N=4)"
    assert RFC(target_nfc=np.int64(14)).schedule.target_nfc == 14


def test_cache_config_modules_list_is_normalised_and_hashable():
    config = CacheConfig(Reuse(), Interval(), modules=["mlp", "attn"])
    assert config.modules == ("attn", "mlp") and hash(config) == hash(CacheConfig(Reuse(), Interval(), ("attn", "mlp")))
    with pytest.raises(ConfigError, match="name must be a str"):
        CacheConfig(Reuse(), Interval(), name=123)


def test_is_enabled_is_false_for_what_relcache_cannot_serve_and_enable_checks_adapter():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)
    unet_pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    assert not relcache.is_enabled(unet_pipe) and not relcache.is_enabled(None) and not relcache.is_enabled("dit")
    model = tiny_dit(layers=1)
    assert not relcache.is_enabled(model)
    with pytest.raises(ConfigError, match=r"adapter must be None .* or a relcache\.models\.Adapter instance.*'dit'"):
        relcache.enable(model, FORA(), adapter="dit")
    with pytest.raises(ConfigError, match="record_errors must be True or False"):
        relcache.enable(model, FORA(), record_errors="yes")
    assert not relcache.is_enabled(model)
    with relcache.cached(model, FORA()):
        assert relcache.is_enabled(model)


@pytest.mark.parametrize("full_steps,message", [
    ([], "full_steps must start at 0 and strictly increase, got []"),
    ([0, 3, 2], "full_steps must start at 0 and strictly increase, got [0, 3, 2]"),
    ([-1], "full_steps must be an integer >= 0, got -1"),
    ("0,1", "full_steps must be a sequence of step indices (e.g. [0, 1, 5]), got '0,1'"),
])
def test_rfc_plus_full_steps_refused_naming_full_steps(full_steps, message):
    """The checks are Steps', whose field is ``steps``: the message named an argument RFCPlus does not have."""
    with pytest.raises(relcache.ConfigError) as err:
        relcache.RFCPlus(full_steps=full_steps)
    assert str(err.value) == message
