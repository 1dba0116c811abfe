"""Every bad input of the spec raises a clear error that names the argument, on every backend."""

import pytest
import torch

import hiprune_ops
from conftest import backend_params

N = 16
MAPS = torch.softmax(torch.randn(2, 2, N + 1, N + 1), dim=-1)
SCORES = torch.rand(2, N)

SELECT_CASES = [
    # (description, object_attn, deep_attn, kwargs, error type, message pattern)
    ("3-D maps", MAPS[0], MAPS, {}, ValueError, "object_attn must be"),
    ("1-D scores", SCORES, SCORES[0], {}, ValueError, "deep_attn must be"),
    ("integer maps", MAPS.to(torch.int32), MAPS, {}, TypeError, "object_attn must be float32"),
    ("integer scores", SCORES, SCORES.to(torch.int64), {}, TypeError, "deep_attn must be float32"),
    ("float64 scores", SCORES.double(), SCORES, {}, TypeError, "object_attn must be float32"),
    ("non-square maps", MAPS[..., :-1], MAPS, {}, ValueError, "object_attn must be square"),
    ("batch mismatch", SCORES, SCORES[:1], {}, ValueError, "deep_attn batch"),
    ("token mismatch", SCORES, torch.rand(2, N + 1), {}, ValueError, "deep_attn has 17 patch tokens"),
    ("budget 0", SCORES, SCORES, {"budget": 0}, ValueError, "budget must be in"),
    ("budget above N", SCORES, SCORES, {"budget": N + 1}, ValueError, "budget must be in"),
    ("grid mismatch", SCORES, SCORES, {"grid_h": 3}, ValueError, "grid_h \\* grid_w"),
    ("zero grid", SCORES, SCORES, {"grid_h": 0, "grid_w": 0}, ValueError, "grid_h and grid_w must be positive"),
    ("alpha above 1", SCORES, SCORES, {"alpha": 1.5}, ValueError, "alpha must be in"),
    ("negative alpha", SCORES, SCORES, {"alpha": -0.1}, ValueError, "alpha must be in"),
    ("nan alpha", SCORES, SCORES, {"alpha": float("nan")}, ValueError, "alpha must be in"),
    ("unknown neighborhood", SCORES, SCORES, {"neighborhood": "diamond"}, ValueError, "neighborhood must be"),
    ("official square", SCORES, SCORES, {"official": True, "neighborhood": "square"}, ValueError,
     "neighborhood='cross' only"),
    ("prefix too large", MAPS, MAPS, {"num_prefix": N + 1}, ValueError, "num_prefix must be in"),
    ("negative prefix", MAPS, MAPS, {"num_prefix": -1}, ValueError, "num_prefix must be in"),
]


def call_select(backend, device, obj, deep, overrides, op="select"):
    kwargs = dict(budget=4, grid_h=4, grid_w=4, alpha=0.1, num_prefix=1 if obj.dim() == 4 else 0)
    kwargs.update(overrides)
    return getattr(hiprune_ops, op)(obj.to(device), deep.to(device), backend=backend, **kwargs)


@pytest.mark.parametrize("backend,device", backend_params("select"))
@pytest.mark.parametrize("case", SELECT_CASES, ids=[c[0] for c in SELECT_CASES])
def test_select_rejects(backend, device, case):
    _, obj, deep, overrides, error, pattern = case
    for op in ("select", "select_with_roles"):
        with pytest.raises(error, match=pattern):
            call_select(backend, device, obj, deep, overrides, op)


@pytest.mark.parametrize("backend,device", backend_params("prune"))
@pytest.mark.parametrize("features,pattern", [
    (torch.randn(2, N), "features must be \\(B, N, C\\)"),
    (torch.randn(3, N, 4), "features batch 3"),
    (torch.randn(2, N + 2, 4), "features has 18 tokens"),
])
def test_prune_rejects(backend, device, features, pattern):
    with pytest.raises(ValueError, match=pattern):
        hiprune_ops.prune(features.to(device), SCORES.to(device), SCORES.to(device), 4, 4, 4, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params("attention_scores"))
@pytest.mark.parametrize("attn,prefix,error,pattern", [
    (torch.rand(2, 5, 5), 0, ValueError, "attn must be \\(B, H, L, L\\)"),
    (torch.rand(1, 2, 5, 4), 0, ValueError, "attn must be square"),
    (torch.ones(1, 2, 5, 5, dtype=torch.int64), 0, TypeError, "attn must be float32"),
    (torch.rand(1, 2, 5, 5), 5, ValueError, "num_prefix must be in"),
])
def test_attention_scores_rejects(backend, device, attn, prefix, error, pattern):
    with pytest.raises(error, match=pattern):
        hiprune_ops.attention_scores(attn.to(device), prefix, backend=backend)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        hiprune_ops.select(SCORES, SCORES, 4, 4, 4, backend="numpy")


def test_mismatched_devices_are_named():
    if not torch.cuda.is_available():
        meta = SCORES.to("meta")
        with pytest.raises(ValueError, match="deep_attn is on"):
            hiprune_ops.reference.select(SCORES, meta, 4, 4, 4)
        return
    with pytest.raises(ValueError, match="deep_attn is on"):
        hiprune_ops.select(SCORES, SCORES.cuda(), 4, 4, 4)
