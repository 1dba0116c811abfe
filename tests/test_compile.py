"""opcheck on every op, and torch.compile(fullgraph=True) over the ops and their Python wrappers."""

import pytest
import torch
import torch._dynamo.testing

import hiprune_ops
from conftest import random_maps, random_scores
from hiprune_ops.backend import has_cpp_kernel

requires_cpp_cpu = pytest.mark.skipif(not has_cpp_kernel("select", "cpu"), reason="C++ CPU kernels not built")


def select_samples():
    maps_obj, maps_deep = random_maps(2, 2, 17, seed=1), random_maps(2, 3, 17, seed=2)
    scores_obj, scores_deep = random_scores(3, 20, seed=3), random_scores(3, 20, seed=4)
    return [
        (maps_obj, maps_deep, 6, 4, 4, 0.5, 1, "cross", False),
        (maps_obj.half(), maps_deep.bfloat16(), 16, 4, 4, 0.1, 1, "square", False),
        (scores_obj, scores_deep, 12, 4, 5, 1.0, 0, "cross", True),
    ]


@requires_cpp_cpu
@pytest.mark.parametrize("op", ["select", "select_with_roles"])
def test_opcheck_select(op):
    for args in select_samples():
        torch.library.opcheck(getattr(torch.ops.hiprune, op), args)


@requires_cpp_cpu
def test_opcheck_attention_scores():
    torch.library.opcheck(torch.ops.hiprune.attention_scores, (random_maps(2, 2, 9, seed=0), 1))
    torch.library.opcheck(torch.ops.hiprune.attention_scores, (random_maps(1, 3, 5, seed=0).transpose(2, 3), 0))


@requires_cpp_cpu
def test_opcheck_prune():
    features = torch.randn(2, 16, 8, requires_grad=True)
    for args in select_samples()[:2]:
        torch.library.opcheck(torch.ops.hiprune.prune, (features,) + args)


@pytest.mark.skipif(not has_cpp_kernel("qk_scores", "cpu"), reason="qk_scores CPU kernel not built")
def test_opcheck_qk_scores():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (q, k, 0.25, 1, None))
    packed_q, packed_k = torch.randn(7, 2, 16, generator=g), torch.randn(7, 2, 16, generator=g)
    cu_seqlens = torch.tensor([0, 3, 4, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.hiprune.qk_scores, (packed_q, packed_k, 0.25, 0, cu_seqlens))


@requires_cpp_cpu
def test_prune_gradient_flows_to_the_kept_features():
    features = torch.randn(2, 16, 4, requires_grad=True)
    obj, deep = random_scores(2, 16, seed=1), random_scores(2, 16, seed=2)
    kept, idx = hiprune_ops.prune(features, obj, deep, 5, 4, 4, 1.0, backend="cpp")
    kept.sum().backward()
    expected = torch.zeros(2, 16, 4)
    for b in range(2):
        expected[b, idx[b]] = 1.0
    assert torch.equal(features.grad, expected)


@requires_cpp_cpu
def test_compile_fullgraph_calls_every_op():
    def pipeline(obj, deep, features):
        scores = torch.ops.hiprune.attention_scores(obj, 1)
        idx = torch.ops.hiprune.select(scores, deep, 6, 4, 4, 0.5, 1)
        idx2, roles = torch.ops.hiprune.select_with_roles(obj, deep, 6, 4, 4, 0.5, 1)
        kept, idx3 = torch.ops.hiprune.prune(features, obj, deep, 6, 4, 4, 0.5, 1)
        return scores * 2, idx, idx2, roles, kept + 1, idx3

    obj, deep, features = random_maps(2, 2, 17, seed=1), random_maps(2, 2, 17, seed=2), torch.randn(2, 16, 8)
    compiled = torch.compile(pipeline, fullgraph=True)
    for got, expected in zip(compiled(obj, deep, features), pipeline(obj, deep, features)):
        assert torch.equal(got, expected)


@requires_cpp_cpu
def test_compile_fullgraph_through_the_python_wrappers():
    def pipeline(obj, deep, features):
        kept, idx = hiprune_ops.prune(features, obj, deep, 6, 4, 4, 0.5, 1)
        return kept, idx, hiprune_ops.select_with_roles(obj, deep, 6, 4, 4, 0.5, 1)[1]

    obj, deep, features = random_maps(2, 2, 17, seed=1), random_maps(2, 2, 17, seed=2), torch.randn(2, 16, 8)
    compiled = torch.compile(pipeline, fullgraph=True, dynamic=True)
    for got, expected in zip(compiled(obj, deep, features), pipeline(obj, deep, features)):
        assert torch.equal(got, expected)


def _every_op(obj, deep, features, q, k, lse, packed_q, packed_k, cu_seqlens, packed_lse):
    scores = torch.ops.hiprune.attention_scores(obj, 1)
    idx = torch.ops.hiprune.select(scores, deep, 6, 4, 4, 0.5, 1)
    idx2, roles = torch.ops.hiprune.select_with_roles(obj, deep, 6, 4, 4, 0.5, 1)
    kept, idx3 = torch.ops.hiprune.prune(features, obj, deep, 6, 4, 4, 0.5, 1)
    two_pass = torch.ops.hiprune.qk_scores(q, k, 0.25, 1)
    one_pass = torch.ops.hiprune.qk_scores(q, k, 0.25, 1, None, lse)
    packed = torch.ops.hiprune.qk_scores(packed_q, packed_k, 0.25, 0, cu_seqlens, packed_lse)
    return scores * 2, idx, idx2, roles, kept + 1, idx3, two_pass, one_pass + 1, packed


@pytest.mark.skipif(not all(has_cpp_kernel(op, "cpu") for op in ("attention_scores", "qk_scores", "select",
                                                                  "select_with_roles", "prune")),
                    reason="C++ CPU kernels not built")
def test_inductor_fullgraph_dynamic_over_every_op():
    """The default backend (inductor), fullgraph, dynamic shapes: a second batch size and sequence length (the
    grid, an int argument, stays 4 x 4) reuse the one compiled graph."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(_every_op, backend=counter, fullgraph=True, dynamic=True)
    for batch, length, seed in ((4, 20, 1), (5, 29, 2)):  # sizes distinct from the fixed ones (duck sizing)
        obj, deep = random_maps(batch, 3, 17, seed=seed), random_maps(batch, 3, 17, seed=seed + 10)
        features = torch.randn(batch, 16, 6)
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(batch, 3, length, 8, generator=g), torch.randn(batch, 3, length, 8, generator=g)
        lse = torch.logsumexp(q @ k.mT * 0.25, dim=-1)
        packed_q, packed_k = q[0].transpose(0, 1), k[0].transpose(0, 1)  # one segment: (T, H, D), lse (H, T)
        cu_seqlens = torch.tensor([0, length], dtype=torch.int32)
        args = (obj, deep, features, q, k, lse, packed_q, packed_k, cu_seqlens, lse[0])
        for got, expected in zip(compiled(*args), _every_op(*args)):
            assert torch.equal(got, expected)
    assert counter.frame_count == 1
