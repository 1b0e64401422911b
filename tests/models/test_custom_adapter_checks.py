"""CustomAdapter's argument checks and its positional timestep (found by a mutation review)."""

from __future__ import annotations

import pytest
import torch

from relcache import ConfigError
from relcache.models.custom import CustomAdapter


def test_empty_blocks_modules_and_negative_timesteps_are_refused():
    with pytest.raises(ConfigError, match="non-empty sequence of blocks"):
        CustomAdapter([], {"attn": "attn"})
    with pytest.raises(ConfigError, match="at least one; got none"):
        CustomAdapter("blocks", {})
    with pytest.raises(ConfigError, match="positional index"):
        CustomAdapter("blocks", {"attn": "attn"}, timestep=-1)


def test_a_positional_timestep_past_the_arguments_reads_none():
    x, t = torch.zeros(1), torch.ones(1)
    adapter = CustomAdapter("blocks", {"attn": "attn"}, timestep=1)
    assert adapter.timestep_of((x, t), {}) is t
    assert adapter.timestep_of((x,), {"timestep": t}) is None  # the index names the position only
    keyword = CustomAdapter("blocks", {"attn": "attn"}, timestep="t")
    assert keyword.timestep_of((x, x), {"t": t}) is t and keyword.timestep_of((x, t), {}) is None
