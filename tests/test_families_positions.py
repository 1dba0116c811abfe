"""Gemma 4's patch grids and raster order from patch positions (families.position_grids / raster_by_position), which
the transformers and the vLLM bindings both read."""

import pytest
import torch

from hiprune_ops.integrations import families


def _row(h, w, length, order=None):
    """(length, 2) (x, y) positions of an h x w grid, in `order` (default raster), padded with (-1, -1)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    real = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    if order is not None:
        real = real[order]
    return torch.cat([real, torch.full((length - h * w, 2), -1)])


def test_grids_and_raster_order_come_from_the_positions():
    order = torch.randperm(4 * 6, generator=torch.Generator().manual_seed(0))
    positions = torch.stack([_row(4, 6, 40, order), _row(2, 2, 40)])
    assert families.position_grids(positions, 2, "pixel_position_ids") == [(4, 6), (2, 2)]
    scores = torch.cat([torch.arange(24, dtype=torch.float32)[order], torch.full((16,), 99.0)])
    assert torch.equal(families.raster_by_position(scores, positions[0], (4, 6)), torch.arange(24.0))


def test_a_row_without_real_patches_is_refused_naming_the_input():
    with pytest.raises(ValueError, match="a row of pixel_position_ids has no real patch"):
        families.position_grids(torch.full((1, 8, 2), -1), 2, "pixel_position_ids")


@pytest.mark.parametrize("row", [_row(3, 4, 16), _row(4, 4, 16)[1:]], ids=["not whole groups", "a hole"])
def test_a_row_that_is_not_a_full_grid_of_whole_groups_is_refused(row):
    with pytest.raises(ValueError, match="not a full .* grid of 2x2 groups"):
        families.position_grids(row[None], 2, "image_position_ids")
