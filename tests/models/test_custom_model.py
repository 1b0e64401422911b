"""CustomAdapter on a hand-written DiT in the original DiT repository's layout (not a diffusers model)."""

from __future__ import annotations

import dataclasses
import re
import types
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from custom_dit import ADAPTER, TinyDiT, modulate, sample

import relcache
from relcache import FORA, RFC, CacheStorage, ConfigError, TaylorSeer, UnsupportedModelError
from relcache.models.custom import CustomAdapter


@pytest.fixture
def model() -> TinyDiT:
    torch.manual_seed(0)
    return TinyDiT().eval()


@pytest.mark.parametrize("config", [FORA(1, 1), TaylorSeer(1, 2, 1), RFC(threshold=0.0), RFC(target_nfc=10)],
                         ids=lambda c: c.label)
def test_every_step_full_equals_uncached(model, config):
    ref = sample(model)
    with relcache.cached(model, config, adapter=CustomAdapter(**ADAPTER)):
        out = sample(model)
        assert relcache.stats(model).nfc == 10
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)


def test_cached_steps_counted_and_predicted(model):
    ref = sample(model)
    adapter = CustomAdapter(**ADAPTER)
    relcache.enable(model, TaylorSeer(4), adapter=adapter)
    assert list(relcache.stats(model).modules) == [
        f"blocks.{i}.{a}" for i in range(3) for a in ("attn", "mlp")
    ]
    first = sample(model, begin=False)
    st = relcache.stats(model)
    second = sample(model, begin=False)  # a new generation noticed from the positional timestep going back up
    relcache.disable(model)
    assert st.full_steps == [0, 1, 5, 9] and st.num_steps == 10 and st.flops_fraction == pytest.approx(0.4)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(first[1], ref[1]) and not torch.equal(first[2], ref[2])
    assert (first[-1] - ref[-1]).abs().max() < 0.5 * ref[-1].abs().max()  # a forecast, not noise

    relcache.enable(model, RFC(target_nfc=5), adapter=adapter)
    sample(model)
    assert abs(relcache.stats(model).nfc - 5) <= 1
    relcache.disable(model)


def test_blocks_as_modules_dotted_attrs_and_inputs(model):
    seen = []

    def input_of(args, kwargs):
        seen.append(args[0].shape)
        return args[0]

    adapter = CustomAdapter(list(model.blocks)[:2], [("attn.proj", "attn"), ("mlp", "mlp")],
                            input_of={"attn.proj": input_of}, timestep=1)
    with relcache.cached(model, FORA(2), adapter=adapter):
        assert list(relcache.stats(model).modules) == [
            "blocks.0.attn.proj", "blocks.0.mlp", "blocks.1.attn.proj", "blocks.1.mlp"
        ]
        sample(model, steps=4)
    assert len(seen) == 2 * 4 and seen[0] == (4, 16, 32)


def test_errors(model):
    with pytest.raises(UnsupportedModelError, match="custom-models.md"):
        relcache.enable(model, FORA())
    with pytest.raises(ConfigError, match="kinds"):
        CustomAdapter("blocks", {"attn": "ffn"})
    with pytest.raises(ConfigError, match="no submodule 'layers'"):
        relcache.enable(model, FORA(), adapter=CustomAdapter("layers", {"attn": "attn"}))
    with pytest.raises(ConfigError, match=r"\['mlp2'\]"):
        relcache.enable(model, FORA(), adapter=CustomAdapter("blocks", {"attn": "attn", "mlp2": "mlp"}))
    assert not relcache.is_enabled(model)


def test_adapter_mistakes_are_named(model):
    """Found by review: each of these failed with an unrelated error (a TypeError, diffusers' "Hook with name
    relcache_module already exists", "no module of the kinds None"), fell back to a default silently, or ran."""
    from relcache.models.base import Slot

    with pytest.raises(ConfigError, match="blocks='blocks.0' names one Block of TinyDiT, not a sequence"):
        relcache.enable(model, FORA(), adapter=CustomAdapter("blocks.0", {"attn": "attn"}))
    with pytest.raises(ConfigError, match=r"probe names attributes that modules does not: \['atn'\]"):
        CustomAdapter("blocks", {"attn": "attn"}, probe={"atn": 0})
    with pytest.raises(ConfigError, match=r"input_of names attributes that modules does not: \['mpl'\]"):
        CustomAdapter("blocks", {"attn": "attn", "mlp": "mlp"}, input_of={"mpl": lambda a, k: a[0]})
    with pytest.raises(ConfigError, match="Slot 'attn' kind must be one of"):
        Slot("attn", "self-attention")

    class _Nothing(CustomAdapter):
        def cached_modules(self, model):
            return []

    with pytest.raises(ConfigError, match="_Nothing found no module to cache in TinyDiT"):
        relcache.enable(model, FORA(), adapter=_Nothing(**ADAPTER))
    shared = TinyDiT()
    shared.blocks[1].mlp = shared.blocks[0].mlp
    with pytest.raises(ConfigError, match="'blocks.0.mlp' and 'blocks.1.mlp' are the same module object"):
        relcache.enable(shared, FORA(), adapter=CustomAdapter(**ADAPTER))
    nested = CustomAdapter("blocks", {"attn": "attn", "mlp": "mlp", "mlp.2": "mlp"})  # its FLOPs counted twice
    with pytest.raises(ConfigError, match=r"'blocks.0.mlp.2' sits inside 'blocks.0.mlp' of TinyDiT: cached modules "
                                          "must not nest"):
        relcache.enable(model, FORA(), adapter=nested)
    assert not relcache.is_enabled(model) and not relcache.is_enabled(shared)


def _attention_twice(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
    h = modulate(self.norm1(x), shift1, scale1)
    x = x + gate1[:, None] * self.attn(h) + gate1[:, None] * self.attn(2 * h)
    return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def test_a_module_called_twice_per_call_or_a_probe_past_its_inputs_is_refused_at_the_first_call(model):
    """Found by review: a module called twice in a block got the same forecast for both (different) inputs at a
    cached step, silently; a probe index past the module's inputs was a bare IndexError."""
    twice = TinyDiT()
    twice.blocks[1].forward = types.MethodType(_attention_twice, twice.blocks[1])
    with relcache.cached(twice, FORA(2), adapter=CustomAdapter(**ADAPTER)):
        with pytest.raises(UnsupportedModelError, match="'blocks.1.attn' was called twice in one call"):
            sample(twice, steps=4)
    with relcache.cached(model, RFC(threshold=0.1), adapter=CustomAdapter(**ADAPTER, probe=1)):
        with pytest.raises(ConfigError, match="probe index 1 of cached module 'blocks.0.attn' is past its 1 input"):
            sample(model, steps=4)
    with relcache.cached(model, FORA(2), adapter=CustomAdapter(**ADAPTER)):  # the model itself is fine
        sample(model, steps=4)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(("input_of", "got"), [(lambda a, k: None, "NoneType"), (lambda a, k: [a[0]], "list"),
                                               (lambda a, k: (), "an empty tuple")])
def test_an_input_of_that_gives_no_tensor_is_refused_naming_the_module(model, input_of, got, batched):
    """Found by review: ``input_of`` returning None or a list failed with a bare AttributeError ('shape', or with
    ``batched=False`` 'unsqueeze')."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the refused generation's step count
        adapter = CustomAdapter(**ADAPTER | {"input_of": input_of, "batched": batched})
        with relcache.cached(model, FORA(2), adapter=adapter):
            with pytest.raises(ConfigError, match=rf"input of cached module 'blocks.0.attn' must be a tensor or a "
                                                  rf"tuple of tensors, got {got}: check the adapter's input_of"):
                sample(model, steps=4)


def test_a_loop_whose_timestep_is_not_found_warns_that_generations_merge(model):
    """Found by review: with ``timestep`` naming no argument and no ``begin_generation``, a second generation
    continued the first one's caches (full steps [0, 3, 6, ...] over both), with no word."""
    adapter = CustomAdapter("blocks", {"attn": "attn", "mlp": "mlp"})  # forward(x, t, y): no "timestep" keyword
    with relcache.cached(model, FORA(3), adapter=adapter):
        with pytest.warns(RuntimeWarning, match="cannot be noticed"):
            sample(model, steps=4, begin=False)
    with relcache.cached(model, FORA(3), adapter=CustomAdapter(**ADAPTER)), warnings.catch_warnings():
        warnings.simplefilter("error")  # found: no warning
        sample(model, steps=4, begin=False)
    with relcache.cached(model, FORA(3), adapter=adapter), warnings.catch_warnings():
        warnings.simplefilter("error")  # announced: no warning
        sample(model, steps=4)


def test_docs_example_runs():
    """The complete example in docs/custom-models.md runs as written."""
    doc = (Path(__file__).parents[2] / "docs" / "custom-models.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc.split("## A complete example")[1], re.S).group(1)
    exec(compile(code, "custom-models.md", "exec"), {"__name__": "docs_example"})


class _DeviceTimestepAdapter(CustomAdapter):
    """Reports the timestep as a meta tensor: it stands for a GPU tensor, and reading its value raises."""

    def timestep_of(self, args, kwargs):
        t = super().timestep_of(args, kwargs)
        return torch.empty_like(t, device="meta")


def test_device_timestep_never_read_once_generations_are_marked(model):
    """A timestep on an accelerator costs a host sync to read; after begin_generation it is not read at all."""
    adapter = _DeviceTimestepAdapter(**ADAPTER)
    ref = sample(model)
    with relcache.cached(model, RFC(target_nfc=5), adapter=adapter):
        marked = sample(model)  # would raise on reading the meta timestep
        assert relcache.stats(model).num_steps == 10
    with relcache.cached(model, RFC(target_nfc=5), adapter=CustomAdapter(**ADAPTER)):
        assert all(torch.equal(a, b) for a, b in zip(marked, sample(model), strict=True))
    assert not torch.equal(marked[-1], ref[-1])
    with relcache.cached(model, FORA(3), adapter=adapter), pytest.raises(RuntimeError, match="meta"):
        sample(model, begin=False)  # unmarked: the timestep is the only way to see a new generation


def test_a_marked_loop_with_rising_timesteps_is_one_generation(model):
    """DDIM inversion runs its timesteps upwards. Once marked, timesteps start no generation on any device: on CPU a
    rising timestep used to restart the generation at every step (nothing cached), while a GPU one was left unread."""
    config = FORA(3)
    with relcache.cached(model, config, adapter=CustomAdapter(**ADAPTER)):
        relcache.begin_generation(model, 10)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for i in range(10):
                x = x + 0.01 * model(x, torch.full((2,), 100 * i), torch.tensor([1, 10]))
        stats = relcache.stats(model)
    assert stats.num_steps == 10
    assert stats.full_steps == config.schedule.full_steps(10) == [0, 1, 4, 7]


class _PackedModel(torch.nn.Module):
    """Blocks whose feed-forward runs on every sample's tokens as one packed sequence: ``(tokens, dim)`` when
    ``packed``, else the same tokens with a leading axis of one. ``joint(x, text)`` returns both streams updated; the
    text stream is the same at every step."""

    def __init__(self, packed: bool, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.packed = packed
        self.t_proj = torch.nn.Linear(1, dim)
        self.text = torch.nn.Parameter(torch.randn(1, 3, dim))
        self.blocks = torch.nn.ModuleList()
        for _ in range(depth):
            block = torch.nn.Module()
            block.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                            torch.nn.Linear(2 * dim, dim))
            block.joint = _Joint(dim)
            block.mod = torch.nn.Linear(dim, dim)
            self.blocks.append(block)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.t_proj(t.float()[:, None] / 1000)
        text = self.text.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            b, n, d = x.shape
            h = (x + block.mod(c)[:, None]).reshape(b * n, d)
            x = x + block.mlp(h if self.packed else h[None]).reshape(b, n, d)
            dx, _ = block.joint(x, text)
            x = x + dx
        return x


class _Joint(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = torch.tanh(self.a(x) + self.b(text).mean(1, keepdim=True))
        return mixed, self.b(text)


def _packed_run(model: torch.nn.Module, steps: int = 12) -> list[torch.Tensor]:
    relcache.begin_generation(model, steps)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad():
        for i in range(steps):
            x = x - 0.1 * model(x, torch.full((2,), 999 - 80 * i))
            outs.append(x)
    return outs


def _joint_inputs(args, kwargs):
    return args[0], args[1]


def test_packed_blocks_without_a_batch_axis():
    """``batched=False``: a packed ``(tokens, dim)`` module is seen with a leading axis of one, so relcache runs exactly
    as on the same tokens held as ``(1, tokens, dim)``; every step full stays uncached."""
    torch.manual_seed(0)
    packed, held = _PackedModel(packed=True), _PackedModel(packed=False)
    held.load_state_dict(packed.state_dict())
    ref = _packed_run(packed)
    modules = {"mlp": "mlp"}
    with relcache.cached(packed, RFC(threshold=0.0), adapter=CustomAdapter("blocks", modules, timestep=1,
                                                                          batched=False)):
        assert all(torch.equal(a, b) for a, b in zip(_packed_run(packed), ref, strict=True))
    with relcache.cached(packed, RFC(target_nfc=5), adapter=CustomAdapter("blocks", modules, timestep=1,
                                                                         batched=False)):
        got, steps = _packed_run(packed), relcache.stats(packed).full_steps
    with relcache.cached(held, RFC(target_nfc=5), adapter=CustomAdapter("blocks", modules, timestep=1)):
        want, want_steps = _packed_run(held), relcache.stats(held).full_steps
    assert steps == want_steps and len(steps) < 12
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(got, want, strict=True))
    assert not torch.allclose(got[-1], ref[-1], rtol=0, atol=1e-6)


def test_probe_names_the_input_rcs_reads():
    """A joint module's second input is the text, the same at every step: RCS reading it (``probe=1``) sees no input
    change and computes only its warm-up steps; reading the latents (``probe=0``) it computes more."""
    torch.manual_seed(0)
    model = _PackedModel(packed=False)
    full = {}
    for probe in (0, 1):
        adapter = CustomAdapter("blocks", {"joint": "attn"}, input_of=_joint_inputs, timestep=1, probe=probe)
        with relcache.cached(model, RFC(threshold=0.05), adapter=adapter):
            _packed_run(model)
            full[probe] = relcache.stats(model).full_steps
    assert full[1] == [0, 1] and len(full[0]) > 2
    # per attribute: the joint module's second input, the feed-forward's only one (RCS decides at the first module)
    adapter = CustomAdapter("blocks", {"mlp": "mlp", "joint": "attn"}, input_of={"joint": _joint_inputs},
                            timestep=1, probe={"joint": 1})
    with relcache.cached(model, RFC(threshold=0.05), adapter=adapter):
        _packed_run(model)
        assert relcache.stats(model).full_steps != [0, 1]  # RCS reads the mlp's input, first in each block: latents
    with pytest.raises(ConfigError, match="probe must be an integer >= 0"):
        CustomAdapter("blocks", {"joint": "attn"}, probe=-1)
    with pytest.raises(ConfigError, match="batched must be True or False"):
        CustomAdapter("blocks", {"joint": "attn"}, batched="no")


class _Pair(NamedTuple):
    out: torch.Tensor
    twice: torch.Tensor


class _Returns(torch.nn.Module):
    """Wraps an attention module to return its output in another layout (``kind``)."""

    def __init__(self, inner: torch.nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x: torch.Tensor) -> Any:
        o = self.inner(x)
        return {"named": _Pair(o, 2 * o), "tuple": (o, 2 * o), "structseq": torch.return_types.max((o, 2 * o)),
                "none": (o, None), "list": [o, 2 * o]}[self.kind]


def _with_attn_returning(kind: str) -> TinyDiT:
    model = TinyDiT()
    for block in model.blocks:
        block.attn = _Returns(block.attn, kind)
        block.forward = types.MethodType(_block_forward, block)
    return model.eval()


def _block_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
    r = self.attn(modulate(self.norm1(x), shift1, scale1))
    a, b = (r.out, r.twice) if self.attn.kind == "named" else r  # read by name: it must come back as a NamedTuple
    x = x + gate1[:, None] * (a + 0.5 * b)
    return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


def test_a_named_tuple_output_comes_back_as_one_and_other_layouts_are_refused_by_name():
    outs = {}
    for kind in ("tuple", "named", "structseq"):  # a structseq takes one sequence, not a NamedTuple's fields
        torch.manual_seed(0)
        model = _with_attn_returning(kind)
        relcache.enable(model, FORA(3), adapter=CustomAdapter(**ADAPTER))
        try:
            outs[kind] = sample(model)  # a NamedTuple came back as a plain tuple: AttributeError 'out'
            assert relcache.stats(model).nfc == 4
        finally:
            relcache.disable(model)
    for a, b, c in zip(outs["tuple"], outs["named"], outs["structseq"], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    for kind, what in (("none", "a tuple holding Tensor, NoneType"), ("list", "list")):
        model = _with_attn_returning(kind)
        relcache.enable(model, FORA(3), adapter=CustomAdapter(**ADAPTER))
        try:
            message = re.escape(f"cached module 'blocks.0.attn' returned {what};")
            with pytest.raises(UnsupportedModelError, match=message):
                sample(model)
        finally:
            relcache.disable(model)


def _gating_in_place(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
    a = self.attn(modulate(self.norm1(x), shift1, scale1))
    x = x + a.mul_(gate1[:, None])  # the gate applied in place, into the cached module's output
    return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


@pytest.mark.parametrize(("method", "cache_dtype"), [("FORA", None), ("FORA", torch.float32), ("RFC+", None)])
def test_a_model_writing_into_a_cached_output_is_refused_at_the_first_cached_step(method, cache_dtype):
    """The cache holds the module's output tensor itself: written into afterwards, every cached step forecast from
    the gated output and compounded the gate (rel. error 0.37 against 0.08 for a copy; found by review)."""
    torch.manual_seed(0)
    model = TinyDiT().eval()
    for block in model.blocks:
        block.forward = types.MethodType(_gating_in_place, block)
    base = FORA(4) if method == "FORA" else relcache.RFCPlus(full_steps=[0, 1, 5])  # RFC+: its own history form
    config = dataclasses.replace(base, cache_dtype=cache_dtype)
    relcache.enable(model, config, adapter=CustomAdapter(**ADAPTER))
    steps = []
    try:
        with pytest.raises(UnsupportedModelError, match=re.escape("wrote into cached module 'blocks.0.attn''s output")):
            sample(model, after_step=lambda: steps.append(1))
        assert len(steps) == 2  # steps 0 and 1 full (warm-up), step 2 the first cached one
    finally:
        relcache.disable(model)
    # a copy (offloaded caches) is not the model's tensor: nothing to refuse
    relcache.enable(model, dataclasses.replace(FORA(4), cache_dtype=CacheStorage(offload=True)),
                    adapter=CustomAdapter(**ADAPTER))
    try:
        assert len(sample(model)) == 10
    finally:
        relcache.disable(model)


def test_an_adapter_holding_another_models_blocks_is_refused_at_enable(model):
    """Found by review: an adapter given one instance's list of blocks, enabled on a copy (an EMA copy made after
    it), was accepted, cached nothing, and ``stats`` reported cached steps."""
    import copy

    adapter = CustomAdapter(model.blocks, {"attn": "attn", "mlp": "mlp"}, timestep=1)
    ema = copy.deepcopy(model)
    with pytest.raises(ConfigError, match=r"cached module 'blocks.0.attn' \(SelfAttention\) is not a submodule of the "
                                          r"TinyDiT being enabled"):
        relcache.enable(ema, FORA(2), adapter=adapter)
    assert not relcache.is_enabled(ema) and not relcache.is_enabled(model)
    with relcache.cached(model, FORA(2), adapter=adapter):  # on the model it was made from, it runs
        sample(model, steps=4)


class _KeywordAttention(torch.nn.Module):
    """Calls its attention by a keyword other than ``hidden_states``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x=x)


class _ByKeyword(torch.nn.Module):
    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def test_an_input_the_runtime_cannot_find_or_of_another_batch_is_refused_naming_the_module(model):
    """Found by review: a module called by a keyword other than ``hidden_states`` failed with a bare TypeError naming
    neither module nor ``input_of``; an ``input_of`` giving a tensor of another batch ran two full steps, then failed
    in a broadcast error at the first cached step. Both now raise ``ConfigError`` at the first call, naming them."""
    keyword = TinyDiT()
    for block in keyword.blocks:
        block.attn = _KeywordAttention(_ByKeyword(block.attn))
    adapter = CustomAdapter("blocks", {"attn.inner": "attn", "mlp": "mlp"}, timestep=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the refused generation's step count
        with relcache.cached(keyword, FORA(2), adapter=adapter):
            with pytest.raises(ConfigError, match=r"cannot find the input of cached module 'blocks.0.attn.inner': no "
                                                  r"positional argument and no hidden_states= \(keywords: \['x'\]\); "
                                                  r"give the adapter an input_of"):
                sample(keyword, steps=4)
        with relcache.cached(keyword, FORA(2), adapter=CustomAdapter(
                "blocks", {"attn.inner": "attn", "mlp": "mlp"}, timestep=1,
                input_of={"attn.inner": lambda a, k: k["x"], "mlp": lambda a, k: a[0]})):
            sample(keyword, steps=4)  # with input_of, it runs
        other = CustomAdapter(**ADAPTER | {"input_of": lambda a, k: torch.zeros(3)})
        for config in (FORA(2), RFC(threshold=0.1)):
            with relcache.cached(model, config, adapter=other):
                with pytest.raises(ConfigError, match=r"input 0 of cached module 'blocks.0.attn' has shape \(3,\), but "
                                                      r"its output's leading axis \(the batch\) is 4"):
                    sample(model, steps=4)


def test_a_split_cfg_loop_with_new_tensors_is_told_how_to_name_its_calls(model):
    """A hand-written loop running CFG as two calls per step, each given a new latents tensor, is taken for twice the
    steps of one context; the warning advised announcing more steps, which kept the two calls' caches mixed (found by
    review). It now says how to tell the calls apart; with the same tensor the two are contexts of their own."""
    def split_loop(clone: bool, steps: int = 6) -> None:
        relcache.begin_generation(model, steps)
        x, y = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 7])
        with torch.no_grad():
            for i in range(steps):
                t = torch.full((2,), 999.0 - 150 * i)
                cond = model(x, t, y)
                uncond = model(x.clone() if clone else x, t, torch.full_like(y, 10))
                x = x - 0.1 * (uncond + 4.0 * (cond - uncond))

    with relcache.cached(model, RFC(target_nfc=4), adapter=CustomAdapter(**ADAPTER)):
        with pytest.warns(RuntimeWarning, match=r"announced 6 steps .* but runs step 7(.|\n)*more than once per step "
                                                r"\(CFG as two calls\) with a different latents tensor"):
            split_loop(clone=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            split_loop(clone=False)
        assert {name: c.nfc for name, c in relcache.stats(model).contexts.items()} == {"default": 4, "default.2": 4}
