"""FLUX's token grid for CFG-Cache (``FluxAdapter.spatial_grid``): the ``img_ids`` it takes and refuses (found by a
mutation review; the layout itself is checked in test_pipelines.py)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from relcache.models.flux import FluxAdapter


def _ids(h: int, w: int) -> torch.Tensor:
    return FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)  # (h·w, 3): (0, row, column)


def test_batched_img_ids_of_older_diffusers_give_the_same_grid():
    tokens = torch.randn(2, 6, 5)
    flat = FluxAdapter().spatial_grid((), {"img_ids": _ids(2, 3)})
    batched = FluxAdapter().spatial_grid((), {"img_ids": _ids(2, 3).unsqueeze(0).expand(2, 6, 3)})
    assert flat is not None and batched is not None
    assert torch.equal(batched[0](tokens), flat[0](tokens)) and batched[0](tokens).shape == (2, 5, 2, 3)


def test_ids_that_are_not_one_grid_of_one_image_are_refused():
    ids = _ids(4, 4)
    assert FluxAdapter().spatial_grid((), {"img_ids": ids}) is not None
    other = ids.clone()
    other[8:, 0] = 1  # the grid's lower half tagged as another image (Kontext's reference tokens): not one image
    assert FluxAdapter().spatial_grid((), {"img_ids": other}) is None
    assert FluxAdapter().spatial_grid((), {"img_ids": ids[:, :2]}) is None  # no column index
    assert FluxAdapter().spatial_grid((), {"img_ids": ids[None, None]}) is None  # 4-D
    assert FluxAdapter().spatial_grid((), {}) is None


def test_the_grid_refuses_tokens_of_another_length():
    to_grid, _ = FluxAdapter().spatial_grid((), {"img_ids": _ids(2, 3)})
    with pytest.raises(ValueError, match=r"expected FLUX tokens of shape \(B, 6, C\), got \(2, 5, 4\)"):
        to_grid(torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="expected FLUX tokens"):
        to_grid(torch.zeros(6, 4))
