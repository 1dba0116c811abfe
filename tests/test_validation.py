"""Edge shapes, layouts and devices on every backend present: B = 0, L = 1, budget = N, mixed devices,
non-contiguous and channels-last inputs, and index arithmetic past 2^31 elements."""

import pytest
import torch

import hiprune_ops
from conftest import backend_params, random_maps, random_scores
from hiprune_ops import reference as ref

# Where a second device is needed: a GPU when there is one, else the meta device (the dispatcher sends a call
# with any meta tensor to the fake kernel, whose checks are the real kernels' checks).
OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def other_device_of(device):
    return "cpu" if device == "cuda" else OTHER_DEVICE


# --- B = 0 -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
@pytest.mark.parametrize("maps", [False, True], ids=["scores", "maps"])
def test_empty_batch_select(backend, device, maps):
    obj = torch.rand(0, 2, 10, 10) if maps else torch.rand(0, 9)
    idx, roles = hiprune_ops.select_with_roles(obj.to(device), obj.to(device), 4, 3, 3, 0.5,
                                               num_prefix=1 if maps else 0, backend=backend)
    assert idx.shape == (0, 4) and idx.dtype == torch.int64 and idx.device.type == device
    assert roles.shape == (0, 4) and roles.dtype == torch.int8


@pytest.mark.parametrize("backend,device", backend_params("prune"))
def test_empty_batch_prune(backend, device):
    kept, idx = hiprune_ops.prune(torch.randn(0, 9, 5).to(device), torch.rand(0, 9).to(device),
                                  torch.rand(0, 9).to(device), 3, 3, 3, backend=backend)
    assert kept.shape == (0, 3, 5) and idx.shape == (0, 3)


@pytest.mark.parametrize("backend,device", backend_params("attention_scores"))
def test_empty_batch_attention_scores(backend, device):
    out = hiprune_ops.attention_scores(torch.rand(0, 2, 5, 5).to(device), 1, backend=backend)
    assert out.shape == (0, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("backend,device", backend_params("qk_scores"))
def test_empty_batch_qk_scores(backend, device):
    q = torch.randn(0, 2, 5, 8).to(device)
    assert hiprune_ops.qk_scores(q, q, 0.5, 1, backend=backend).shape == (0, 4)


# --- L = 1 and budget = N -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
def test_single_token(backend, device):
    attn = torch.ones(2, 3, 1, 1)
    assert torch.equal(hiprune_ops.attention_scores(attn.to(device), backend=backend).cpu(), torch.ones(2, 1))
    idx, roles = hiprune_ops.select_with_roles(attn.to(device), attn.to(device), 1, 1, 1, 1.0, backend=backend)
    assert idx.cpu().tolist() == [[0], [0]]
    assert torch.equal(roles.cpu(), ref.select_with_roles(attn, attn, 1, 1, 1, 1.0)[1])


@pytest.mark.parametrize("backend,device", backend_params("qk_scores"))
def test_single_token_qk_scores(backend, device):
    q = torch.randn(2, 3, 1, 8)
    # One key per query: softmax is exactly 1.
    assert torch.equal(hiprune_ops.qk_scores(q.to(device), q.to(device), 0.3, backend=backend).cpu(),
                       torch.ones(2, 1))


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
@pytest.mark.parametrize("neighborhood,official", [("cross", False), ("square", False), ("cross", True)])
def test_budget_equal_to_n_keeps_every_token(backend, device, neighborhood, official):
    grid_h, grid_w = 4, 5
    obj, deep = random_scores(3, 20, seed=1), random_scores(3, 20, seed=2)
    args = (20, grid_h, grid_w, 0.3, 0, neighborhood, official)
    idx, roles = hiprune_ops.select_with_roles(obj.to(device), deep.to(device), *args, backend=backend)
    assert torch.equal(idx.cpu(), torch.arange(20).expand(3, 20))
    assert torch.equal(roles.cpu(), ref.select_with_roles(obj, deep, *args)[1])


# --- mixed devices ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params("prune"))
def test_mixed_devices_are_named(backend, device):
    other = other_device_of(device)
    scores = random_scores(2, 16)
    here, there = scores.to(device), scores.to(other)
    with pytest.raises(ValueError, match=f"deep_attn is on {other}"):
        hiprune_ops.select(here, there, 4, 4, 4, backend=backend)
    with pytest.raises(ValueError, match=f"deep_attn is on {other}"):
        hiprune_ops.select_with_roles(here, there, 4, 4, 4, backend=backend)
    with pytest.raises(ValueError, match=f"features is on {other}"):
        hiprune_ops.prune(torch.randn(2, 16, 3).to(other), here, here, 4, 4, 4, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params("qk_scores"))
def test_mixed_devices_are_named_qk_scores(backend, device):
    other = other_device_of(device)
    q = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match=f"k is on {other}"):
        hiprune_ops.qk_scores(q.unsqueeze(0).to(device), q.unsqueeze(0).to(other), 0.5, backend=backend)
    cu_seqlens = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"cu_seqlens is on {other}"):
        hiprune_ops.qk_scores(q.to(device), q.to(device), 0.5, 0, cu_seqlens.to(other), backend=backend)


# --- layouts ------------------------------------------------------------------------------------------------------

def layouts(maps):
    """The same values as `maps` (B, H, L, L) in other memory layouts."""
    wide = torch.zeros(maps.shape[0], 2 * maps.shape[1], *maps.shape[2:])
    wide[:, ::2] = maps
    return {
        "transposed": maps.transpose(2, 3).contiguous().transpose(2, 3),
        "channels_last": maps.contiguous(memory_format=torch.channels_last),
        "strided_heads": wide[:, ::2],
        "expanded_batch": maps[:1].expand(maps.shape),
    }


@pytest.mark.parametrize("backend,device", backend_params("select_with_roles"))
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided_heads", "expanded_batch"])
def test_layouts_give_the_contiguous_result(backend, device, layout):
    maps = random_maps(2, 2, 17, seed=3)
    maps[1] = maps[0]  # expanded_batch repeats image 0
    other = layouts(maps)[layout]
    assert not other.is_contiguous()
    args = (6, 4, 4, 0.5, 1)
    expected_scores = ref.attention_scores(maps, 1)
    assert torch.equal(hiprune_ops.attention_scores(other.to(device), 1, backend=backend).cpu(), expected_scores)
    expected = ref.select_with_roles(maps, maps.flip(-1), *args)
    idx, roles = hiprune_ops.select_with_roles(other.to(device), other.flip(-1).to(device), *args, backend=backend)
    assert torch.equal(idx.cpu(), expected[0]) and torch.equal(roles.cpu(), expected[1])
    # Scores and features that are views: a column slice and a transpose.
    scores = random_scores(16, 2, seed=4).t()
    features = torch.randn(2, 8, 16).transpose(1, 2)
    kept, idx = hiprune_ops.prune(features.to(device), scores.to(device), scores[:, [*range(1, 16), 0]].to(device),
                                  *args[:3], backend=backend)
    expected_idx = ref.select(scores, scores[:, [*range(1, 16), 0]], *args[:3])
    assert torch.equal(idx.cpu(), expected_idx)
    assert torch.equal(kept.cpu(), torch.gather(features, 1, expected_idx.unsqueeze(-1).expand(-1, -1, 8)))


@pytest.mark.parametrize("backend,device", backend_params("qk_scores"))
def test_qk_scores_layouts(backend, device):
    # Hugging Face keeps q, k as (B, L, H, D) and transposes them: a view, not a copy.
    q, k = torch.randn(2, 19, 3, 16), torch.randn(2, 19, 3, 16)
    expected = hiprune_ops.qk_scores(q.transpose(1, 2).contiguous().to(device),
                                     k.transpose(1, 2).contiguous().to(device), 0.25, 1, backend=backend)
    out = hiprune_ops.qk_scores(q.transpose(1, 2).to(device), k.transpose(1, 2).to(device), 0.25, 1,
                                backend=backend)
    torch.testing.assert_close(out.cpu(), expected.cpu(), rtol=2e-6, atol=0)


# --- past 2^31 elements -------------------------------------------------------------------------------------------

BIG = (8, 16, 4096, 4096)  # B * H * L * L = 2^31


@pytest.mark.parametrize("backend,device", [p for p in backend_params("select") if p.id in ("cpp-cpu", "cpp-cuda",
                                                                                               "triton-cuda")])
def test_maps_past_2_31_elements(backend, device):
    # An expanded map: 2^31 logical elements over one 64 MiB (L, L) image, read through stride-0 batch and heads.
    base = torch.softmax(torch.randn(1, 1, 4096, 4096, generator=torch.Generator().manual_seed(0)), dim=-1)
    big = base.to(device).expand(BIG)
    assert big.numel() >= 2**31
    scores = hiprune_ops.attention_scores(big, 0, backend=backend)
    expected = (base[0, 0].double().sum(0) / 4096).float()
    torch.testing.assert_close(scores.cpu(), expected.expand(8, 4096), rtol=1e-6, atol=0)
    deep = random_scores(8, 4096, seed=1)
    idx = hiprune_ops.select(big, deep.to(device), 192, 64, 64, backend=backend)  # the map reduced in the kernel
    assert torch.equal(idx.cpu(), ref.select(scores.cpu(), deep, 192, 64, 64))


def test_shapes_past_2_31_elements_on_meta():
    big = torch.empty(BIG, device="meta")
    assert hiprune_ops.attention_scores(big).shape == (8, 4096)
    idx, roles = torch.ops.hiprune.select_with_roles(big, big, 4096, 64, 64) if hiprune_ops.extension_loaded() \
        else hiprune_ops.ops.select_with_roles_fake(big, big, 4096, 64, 64)
    assert idx.shape == roles.shape == (8, 4096)
    q = torch.empty(8, 16, 46341, 64, device="meta")  # B * H * L * L > 2^38
    assert hiprune_ops.ops.qk_scores_fake(q, q, 0.125).shape == (8, 46341)
