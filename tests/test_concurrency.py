"""The ops called from several Python threads, in DataLoader workers (fork and spawn), and after
torch.set_num_threads changes give the results of serial calls in the main process."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import hiprune_ops
from conftest import random_maps, random_scores

CPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not hiprune_ops.extension_loaded(), reason="no extension"))
                if b == "cpp" else b for b in ("cpp", "torch")]


def run_all_ops(seed, backend):
    """Every op on one seeded problem: a tuple of their outputs."""
    obj, deep = random_maps(2, 2, 50, seed=seed), random_maps(2, 3, 50, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 2, 50, 16, generator=g), torch.randn(2, 2, 50, 16, generator=g)
    features = torch.randn(2, 49, 4, generator=g)
    return (
        hiprune_ops.attention_scores(obj, 1, backend=backend),
        hiprune_ops.qk_scores(q, k, 0.25, 1, backend=backend),
        *hiprune_ops.select_with_roles(obj, deep, 20, 7, 7, 0.5, 1, backend=backend),
        hiprune_ops.select(random_scores(2, 49, seed=seed), deep, 10, 7, 7, 0.3, 1, "square", backend=backend),
        *hiprune_ops.prune(features, obj, deep, 12, 7, 7, 0.2, 1, backend=backend),
    )


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)


SEEDS = list(range(6))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_threads_match_serial_calls(backend):
    serial = {seed: run_all_ops(seed, backend) for seed in SEEDS}
    start = threading.Barrier(4)

    def worker(shift):
        start.wait()  # four threads inside the ops at once, each on every problem, in a rotated order
        return [(seed, run_all_ops(seed, backend)) for seed in SEEDS[shift:] + SEEDS[:shift]]

    with ThreadPoolExecutor(4) as pool:
        for results in pool.map(worker, range(4)):
            for seed, outputs in results:
                assert_same(outputs, serial[seed])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_results_do_not_depend_on_the_thread_count(backend):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = [run_all_ops(seed, backend) for seed in SEEDS]
        for threads in (2, 3, 1, 4):
            torch.set_num_threads(threads)
            for seed in SEEDS:
                assert_same(run_all_ops(seed, backend), expected[seed])
    finally:
        torch.set_num_threads(before)


class OpsDataset(Dataset):
    """Each item runs every op: a DataLoader worker calls the kernels in its own process."""

    def __init__(self, backend):
        self.backend = backend

    def __len__(self):
        return len(SEEDS)

    def __getitem__(self, seed):
        return run_all_ops(seed, self.backend)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_match_the_main_process(context):
    backend = "cpp" if hiprune_ops.extension_loaded() else "torch"
    # The main process runs the ops (and its OpenMP pool) before forking: the workers must not inherit a broken pool.
    expected = [run_all_ops(seed, backend) for seed in SEEDS]
    loader = DataLoader(OpsDataset(backend), batch_size=None, num_workers=2, multiprocessing_context=context,
                        timeout=300)
    for seed, outputs in enumerate(loader):
        assert_same(outputs, expected[seed])
