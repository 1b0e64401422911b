"""Rules of the model-adapter layer (src/relcache/models/) that the family contract tests do not reach: each test
checks one rule by hand on tiny tensors or modules (found by a mutation review)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import relcache
from relcache.models.base import CachedModule, first_tensor_input


# -- first_tensor_input: lists of tensors (Z-Image), lists of lists (Z-Image omni) ---------------------------------
def test_first_tensor_input_takes_the_first_tensor_of_nested_lists():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert first_tensor_input(([a, b],), {}) is a  # one latent per sample: the first sample's
    assert first_tensor_input(([[a, b], [c]],), {}) is a  # Z-Image omni: a list of lists
    assert first_tensor_input((), {"hidden_states": [[b], [c]]}) is b
    assert first_tensor_input((c, a), {"hidden_states": b}) is c  # the positional argument wins


# -- CachedModule.outputs: an empty tuple is refused by name ---------------------------------------------------------
def test_a_module_returning_an_empty_tuple_is_refused_naming_it():
    spec = CachedModule("blocks.0.attn", nn.Identity(), "attn")
    with pytest.raises(relcache.UnsupportedModelError, match=r"'blocks.0.attn' returned a tuple holding nothing"):
        spec.outputs(())
    x = torch.zeros(2, 3)
    assert spec.outputs((x,))[0] is x


# -- the registry: a subclass of a served class is served; a later registration wins --------------------------------
def _bare(cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` without its ``__init__`` (the registry reads only the class)."""
    return cls.__new__(cls)


def test_a_subclass_of_a_served_class_is_served_by_its_adapter():
    from diffusers import FluxTransformer2DModel

    from relcache.models import find_adapter
    from relcache.models.flux import FluxAdapter

    class MyFlux(FluxTransformer2DModel):
        pass

    assert type(find_adapter(_bare(MyFlux))) is FluxAdapter


def test_a_later_registration_takes_precedence(monkeypatch):
    from diffusers import FluxTransformer2DModel

    from relcache.models import base, find_adapter, register_adapter
    from relcache.models.custom import CustomAdapter
    from relcache.models.flux import FluxAdapter

    monkeypatch.setattr(base, "_ADAPTERS", list(base._ADAPTERS))  # the registry as it was after the test
    model = _bare(FluxTransformer2DModel)
    assert type(find_adapter(model)) is FluxAdapter
    mine = register_adapter(CustomAdapter("transformer_blocks", {"attn": "attn"},
                                          model_classes=("FluxTransformer2DModel",)))
    assert find_adapter(model) is mine
    given = CustomAdapter("transformer_blocks", {"ff": "mlp"})
    assert find_adapter(model, given) is given  # an adapter passed in is used as given


# -- joint_inputs: the two streams by keyword or position -------------------------------------------------------------
def test_joint_inputs_by_keyword_or_position():
    from relcache.models.base import joint_inputs

    h, e = torch.zeros(1), torch.ones(1)
    for args, kwargs in (((h, e), {}), ((h,), {"encoder_hidden_states": e}),
                         ((), {"hidden_states": h, "encoder_hidden_states": e}),
                         ((e,), {"hidden_states": h})):  # the image stream by keyword: the text is the one positional
        got = joint_inputs(args, kwargs)
        assert len(got) == 2 and got[0] is h and got[1] is e, (len(args), sorted(kwargs))


# -- the shape table: an unknown shape is a ConfigError listing the known ones ---------------------------------------
def test_an_unknown_block_shape_is_refused_naming_the_known_ones():
    from relcache.models.base import SHAPES, Blocks

    with pytest.raises(relcache.ConfigError, match=r"unknown block shape 'basik'; known shapes: basic, self_attn_ff"):
        Blocks("transformer_blocks", "basik").slots()
    assert Blocks("transformer_blocks", "basic").slots() is SHAPES["basic"]


def test_registered_rows_are_in_registration_order(monkeypatch):
    from relcache.models import base
    from relcache.models.base import Blocks, ModelRow, register_row, registered_rows

    monkeypatch.setattr(base, "_ADAPTERS", [])
    first = ModelRow("A", "APipeline", ("AModel",), (Blocks("blocks", "basic"),))
    second = ModelRow("B", "BPipeline", ("BModel",), (Blocks("blocks", "attn_ff"),))
    register_row(first)
    base.register_adapter(relcache.CustomAdapter("blocks", {"attn": "attn"}))  # not a table adapter: no row
    register_row(second)
    assert registered_rows() == [first, second]
    assert base.supported_models() == ["AModel", "BModel"]


# -- where each adapter reads a call's timestep, latents and extra calls ----------------------------------------------
def test_each_adapter_reads_the_timestep_where_its_model_takes_it():
    from relcache.models.cosmos3 import Cosmos3Adapter
    from relcache.models.hidream import HiDreamAdapter
    from relcache.models.omnigen import OmniGenAdapter
    from relcache.models.z_image import ZImageAdapter

    x, t = torch.zeros(1), torch.tensor([0.25])
    assert HiDreamAdapter().timestep_of((x, t), {}) is t  # timesteps, second positionally
    assert HiDreamAdapter().timestep_of((x,), {"timesteps": t}) is t and HiDreamAdapter().timestep_of((x,), {}) is None
    for rising in (OmniGenAdapter(), ZImageAdapter()):  # the noise level 1 - t: it falls through a generation
        assert torch.equal(rising.timestep_of((x, t), {}), torch.tensor([0.75])), type(rising).__name__
        assert rising.timestep_of((x,), {}) is None
    assert torch.equal(ZImageAdapter().timestep_of((x,), {"t": t}), torch.tensor([0.75]))
    assert torch.equal(OmniGenAdapter().timestep_of((x,), {"timestep": t}), torch.tensor([0.75]))
    assert Cosmos3Adapter().timestep_of((), {"vision_timesteps": t, "timestep": x}) is t


def test_cosmos3_reads_its_latents_from_the_vision_tokens_by_keyword_or_position():
    from relcache.models.cosmos3 import Cosmos3Adapter

    first, second = torch.zeros(1, 2), torch.ones(1, 2)
    assert Cosmos3Adapter().hidden_of((), {"vision_tokens": [first, second]}) is first
    assert Cosmos3Adapter().hidden_of((None,) * 5 + ([first, second],), {}) is first  # sixth positionally


def test_sd3_skip_layer_calls_and_sana_wm_capture_calls_are_extra():
    from relcache.models.sana_wm import SanaWMRefinerAdapter
    from relcache.models.sd3 import SD3Adapter

    sd3 = SD3Adapter()
    assert sd3.extra_call((), {"skip_layers": [1]})
    assert not sd3.extra_call((), {"skip_layers": None}) and not sd3.extra_call((), {"skip_layers": []})
    assert not sd3.extra_call((), {})
    wm = SanaWMRefinerAdapter()
    assert wm.extra_call((), {"kv_cache_mode": "capture_pre_rope"})
    assert wm.extra_call((), {"kv_cache_mode": "inject_and_capture_post_rope"})
    assert not wm.extra_call((), {"kv_cache_mode": "inject"}) and not wm.extra_call((), {})


def test_interleaved_groups_of_unequal_lengths_are_refused():
    """Latte-style interleaving pairs layer i of each group: a group shorter than another would silently drop the
    other's last blocks."""
    from relcache.models.base import Blocks, ModelRow, modules_of_row

    def block() -> nn.Module:
        b = nn.Module()
        b.attn1, b.ff = nn.Linear(2, 2), nn.Linear(2, 2)
        return b

    model = nn.Module()
    model.spatial = nn.ModuleList([block(), block()])
    model.temporal = nn.ModuleList([block()])
    row = ModelRow("X", "XPipeline", ("X",), (Blocks("spatial", "self_attn_ff"), Blocks("temporal", "self_attn_ff")),
                   interleave=True)
    with pytest.raises(ValueError):
        modules_of_row(model, row)
    model.temporal.append(block())
    assert [m.name for m in modules_of_row(model, row)] == [
        "spatial.0.attn1", "spatial.0.ff", "temporal.0.attn1", "temporal.0.ff",
        "spatial.1.attn1", "spatial.1.ff", "temporal.1.attn1", "temporal.1.ff"]
