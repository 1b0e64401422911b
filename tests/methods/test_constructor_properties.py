"""Property-based checks of the public constructors and arguments ``test_constructors.py`` does not cover:
``CustomAdapter``, ``enable``'s keyword arguments (``adapter``, ``record_errors``, ``count_flops``) and
``begin_generation``'s ``num_steps``. Any invalid value is refused up front with a ConfigError naming the parameter
(and leaves nothing enabled); any valid one runs a short generation on a tiny model."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import run_loop, tiny_dit
from custom_dit import TinyDiT, sample
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import relcache
from relcache import FORA, RFC, ConfigError, CustomAdapter, TaylorSeer
from relcache.models.base import first_tensor_input

FAST = settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                       HealthCheck.function_scoped_fixture])
RUNS = settings(max_examples=5, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                                     HealthCheck.function_scoped_fixture])
KINDS = ("attn", "cross_attn", "mlp")
NOT_A_NAME = st.one_of(st.none(), st.integers(), st.floats(), st.just(b"attn"), st.just(["attn"]), st.just(""))


def _names(message: str, param: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(param)}(?![\w])", message) is not None


# -- CustomAdapter -------------------------------------------------------------------------------------------------
ATTRS = st.sampled_from(["attn", "mlp", "attn.proj", "attn.qkv", "mlp.0"])


def _nested(modules: dict | list) -> bool:
    """Whether one attribute sits inside another ("attn" and "attn.proj"): refused at enable."""
    names = [a for a, _ in (modules.items() if isinstance(modules, dict) else modules)]
    return any(b.startswith(a + ".") for a in names for b in names)


# valid module maps for TinyDiT's blocks: attributes that exist and do not nest, any kinds, as a dict or a list of pairs
VALID_MODULES = st.one_of(
    st.dictionaries(ATTRS, st.sampled_from(KINDS), min_size=1, max_size=3),
    st.lists(st.tuples(ATTRS, st.sampled_from(KINDS)), min_size=1, max_size=3, unique_by=lambda p: p[0]),
).filter(lambda m: not _nested(m))
BAD_MODULES = st.one_of(
    st.just({}), st.just([]), st.none(), st.integers(), st.just("attn"),
    st.dictionaries(ATTRS, st.text(max_size=5).filter(lambda k: k not in KINDS), min_size=1, max_size=2),
    st.lists(st.tuples(ATTRS), min_size=1, max_size=2),  # not pairs
    st.lists(st.tuples(ATTRS, st.sampled_from(KINDS), ATTRS), min_size=1, max_size=2),  # triples
    st.builds(lambda a, k: [(a, k)], NOT_A_NAME, st.sampled_from(KINDS)),  # attribute not a name
    st.builds(lambda a, k: {a: k}, ATTRS, st.one_of(st.none(), st.integers(), st.just(["attn"]))),
)
VALID_BLOCKS = st.sampled_from(["blocks", "list", "modulelist"])
BAD_BLOCKS = st.one_of(st.none(), st.integers(), st.just(""), st.just([]), st.just(nn.Linear(2, 2)),
                       st.just([1, 2]), st.just(b"blocks"))
VALID_TIMESTEPS = st.one_of(st.just("t"), st.just(1), st.just(np.int64(1)), st.just("timestep"))
BAD_TIMESTEPS = st.one_of(st.none(), st.integers(max_value=-1), st.floats(), st.booleans(), st.just(""),
                          st.just(["timestep"]))
BAD_INPUT_OF = st.one_of(st.none(), st.integers(), st.just("x"), st.just({"attn": 3}), st.just({1: first_tensor_input}))
BAD_CLASSES = st.one_of(st.just("TinyDiT"), st.none(), st.integers(), st.just((1,)), st.just(("",)))

BASE = {"blocks": "blocks", "modules": {"attn": "attn", "mlp": "mlp"}}
INVALID = {"blocks": BAD_BLOCKS, "modules": BAD_MODULES, "timestep": BAD_TIMESTEPS, "input_of": BAD_INPUT_OF,
           "model_classes": BAD_CLASSES}


@pytest.mark.parametrize("param", list(INVALID))
@FAST
@given(data=st.data())
def test_custom_adapter_refuses_an_invalid_value_naming_it(param, data):
    value = data.draw(INVALID[param], label=param)
    with pytest.raises(ConfigError) as err:
        CustomAdapter(**{**BASE, param: value})
    assert _names(str(err.value), param), str(err.value)


@pytest.fixture(scope="module")
def custom_model():
    torch.manual_seed(0)
    return TinyDiT().eval()


def _blocks(model, kind):
    return {"blocks": "blocks", "list": list(model.blocks), "modulelist": model.blocks}[kind]


@RUNS
@given(blocks=VALID_BLOCKS, modules=VALID_MODULES, timestep=VALID_TIMESTEPS, per_attr=st.booleans())
def test_custom_adapter_valid_values_run(custom_model, blocks, modules, timestep, per_attr):
    """Any valid adapter enables and runs a short CFG loop on the hand-written DiT (which takes ``t`` positionally
    at index 1, so a keyword name only loses generation detection, which ``begin_generation`` covers)."""
    attrs = [a for a, _ in (modules.items() if isinstance(modules, dict) else modules)]
    input_of = {a: first_tensor_input for a in attrs} if per_attr else first_tensor_input
    adapter = CustomAdapter(_blocks(custom_model, blocks), modules, input_of=input_of, timestep=timestep,
                            model_classes=["TinyDiT"])
    assert adapter.model_classes == ("TinyDiT",)
    with relcache.cached(custom_model, FORA(2, 1), adapter=adapter):
        outs = sample(custom_model, steps=3)
        st_ = relcache.stats(custom_model)
    assert st_.num_steps == 3 and len(st_.modules) == len(attrs) * len(custom_model.blocks)
    assert all(torch.isfinite(o).all() for o in outs)


# -- enable's keyword arguments and begin_generation ---------------------------------------------------------------
BAD_BOOLS = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just(np.bool_(True)), st.floats())
ENABLE_INVALID = {"record_errors": BAD_BOOLS, "count_flops": BAD_BOOLS,
                  "adapter": st.one_of(st.text(max_size=4), st.integers(), st.just(CustomAdapter), st.just({}))}


@pytest.fixture(scope="module")
def model():
    return tiny_dit(layers=2)


@pytest.mark.parametrize("param", list(ENABLE_INVALID))
@FAST
@given(data=st.data())
def test_enable_refuses_an_invalid_keyword_naming_it(model, param, data):
    value = data.draw(ENABLE_INVALID[param], label=param)
    with pytest.raises(ConfigError) as err:
        relcache.enable(model, FORA(), **{param: value})
    assert _names(str(err.value), param), str(err.value)
    assert not relcache.is_enabled(model)


@FAST
@given(num_steps=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=2),
                           st.just(torch.tensor(2.0)), st.just(np.float64(3.0))))
def test_begin_generation_refuses_an_invalid_num_steps(model, num_steps):
    with relcache.cached(model, FORA()):
        with pytest.raises(ConfigError) as err:
            relcache.begin_generation(model, num_steps)
    assert _names(str(err.value), "num_steps"), str(err.value)


CONFIGS = st.one_of(st.builds(FORA, st.integers(1, 3), st.integers(1, 2)),
                    st.builds(lambda n: RFC(target_nfc=n, warmup=1), st.integers(1, 3)),
                    st.builds(lambda t: RFC(threshold=t), st.floats(0, 1)),
                    st.builds(TaylorSeer, st.integers(1, 3), st.integers(0, 4), st.integers(1, 2)))


@RUNS
@given(config=CONFIGS, record_errors=st.booleans(), count_flops=st.booleans(),
       num_steps=st.sampled_from([3, np.int64(3), torch.tensor(3)]))
def test_valid_keywords_run(model, config, record_errors, count_flops, num_steps):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 5])
    with relcache.cached(model, config, record_errors=record_errors, count_flops=count_flops):
        relcache.begin_generation(model, num_steps)
        outs = run_loop(model, x, y, steps=3, begin=False)
        st_ = relcache.stats(model)
    assert st_.num_steps == 3 and all(torch.isfinite(o).all() for o in outs)
    assert math.isnan(st_.flops_fraction) == (not count_flops) == (st_.flops_unknown is not None)
    assert bool(st_.contexts["default"].module_errors) == (record_errors and st_.nfc < 3)
