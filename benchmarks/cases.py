"""The one list of benchmark cases, shared by `python -m benchmarks` and `pytest benchmarks/`.

A case is a set of inputs (built lazily by `setup`) and a list of candidates timed side by side on them; one
candidate is the case's baseline, and every ratio is a time over the baseline's time in the same run. Shapes come
from the profile: "smoke" (tiny, each case once in CI), "quick" (about 10 minutes on a 2-core CPU), "full".
A candidate that cannot run here (no kernel for the device, no GPU, too much memory) gives the reason and is
skipped. To add a candidate, add one Candidate(...) line to the list of its group.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import hiprune_ops
from hiprune_ops import reference
from hiprune_ops.backend import has_cpp_kernel, triton_usable

from hiprune_ops import published

GIB = 2 ** 30
RATIOS = (0.333, 0.222, 0.111)  # of the merged tokens of a Qwen2.5-VL image


@dataclass(frozen=True)
class Profile:
    name: str
    timing: dict                   # warmup / repeat / rounds of the fast cases
    heavy_timing: dict             # the same for end-to-end cases (after two memory calls each, the first discarded)
    map_batches: tuple             # select from maps, LLaVA-1.5 24x24
    map_grid: int
    map_dtypes: tuple              # lower precisions of the maps, at batch 8
    score_batches: tuple           # select from scores, batch sweep at budget 192
    budgets: tuple
    budget_batch: int
    qwen_grids: tuple              # merged grids for the ratio sweep
    next_images: int               # LLaVA-NeXT: images of base + 4 tiles
    score_lengths: tuple           # qk_scores sweep
    score_heads: int
    score_dim: int
    clip: dict                     # CLIP encoder: config overrides and batches
    qwen: dict                     # Qwen tower: config overrides and patch grid
    llava: dict                    # reduced LLaVA: LM depth, tower overrides, budgets
    prompt: dict                   # prompt_select: models (grid side, channels, budgets), batches


# prompt_select: (model, grid side, prefix tokens of its maps (0: selection from merged-token scores only),
# the width of the language model's embeddings, budgets). LLaVA-1.5: CLIP's 24x24 patches, LLaMA-7B's 4096;
# Qwen2.5-VL-7B: 32x32 merged tokens (a 896 x 896 image), 3584 wide, 33.4% kept.
_PROMPT_MODELS = (("LLaVA-1.5", 24, 1, 4096, (192, 64)), ("Qwen2.5-VL", 32, 0, 3584, (342,)))
_TINY_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  projection_dim=64)
PROFILES = {
    "smoke": Profile(
        "smoke", dict(warmup=0, repeat=1, rounds=1), dict(warmup=0, repeat=1, rounds=1),
        map_batches=(2,), map_grid=8, map_dtypes=(), score_batches=(1, 4), budgets=(30, 40), budget_batch=2,
        qwen_grids=(16,), next_images=1, score_lengths=(33,), score_heads=2, score_dim=16,
        clip=dict(overrides=dict(_TINY_CLIP, image_size=84), batches=(1,)),
        qwen=dict(overrides=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                                 fullatt_block_indexes=[1, 3]), grid=16),
        llava=dict(lm=dict(hidden=64, intermediate=128, layers=1, heads=4), vision=dict(_TINY_CLIP, image_size=84),
                   budgets=(None, 12, 6), text_tokens=8),
        prompt=dict(models=(("LLaVA-1.5", 8, 1, 32, (21, 7)), ("Qwen2.5-VL", 8, 0, 24, (21,))), batches=(1, 2))),
    "quick": Profile(
        "quick", dict(warmup=2, repeat=3, rounds=3), dict(warmup=0, repeat=1, rounds=2),
        map_batches=(8,), map_grid=24, map_dtypes=(), score_batches=(1, 8, 32, 64), budgets=(64, 128, 192),
        budget_batch=32, qwen_grids=(32, 64, 128), next_images=8, score_lengths=(577, 1024, 2048, 4096),
        score_heads=16, score_dim=80,
        clip=dict(overrides={}, batches=(1,)),
        qwen=dict(overrides=dict(depth=4, fullatt_block_indexes=[1, 3]), grid=64),
        llava=dict(lm=dict(layers=2), vision={}, budgets=(None, 192, 128, 64), text_tokens=64),
        prompt=dict(models=_PROMPT_MODELS, batches=(1, 32))),
    "full": Profile(
        "full", dict(warmup=3, repeat=5, rounds=3), dict(warmup=0, repeat=1, rounds=3),
        map_batches=(1, 8, 32), map_grid=24, map_dtypes=("float16", "bfloat16"),
        score_batches=(1, 2, 4, 8, 16, 32, 64), budgets=(64, 128, 192), budget_batch=32,
        qwen_grids=(16, 32, 64, 128), next_images=8,
        score_lengths=(577, 1024, 2048, 4096, 8192, 16384), score_heads=16, score_dim=80,
        clip=dict(overrides={}, batches=(1, 8)),
        qwen=dict(overrides={}, grid=64),
        llava=dict(lm=dict(layers=4), vision={}, budgets=(None, 192, 128, 64), text_tokens=64),
        prompt=dict(models=_PROMPT_MODELS, batches=(1, 8, 32))),
}


@dataclass(frozen=True)
class Candidate:
    name: str
    make: Callable[[SimpleNamespace], Callable[[], object]]     # inputs -> the function to time
    skip: Callable[[dict, str], Optional[str]] = lambda params, device: None  # a reason not to run here


@dataclass
class Case:
    group: str
    name: str
    params: dict                   # the shapes, reported with every row
    setup: Callable[[], SimpleNamespace]
    candidates: list
    baseline: str
    heavy: bool = False
    check: Optional[Callable[[SimpleNamespace], None]] = None   # raises if the candidates disagree

    def shape(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())

    def runnable(self, device: str) -> list:
        """(candidate, skip reason or None) for every candidate."""
        return [(c, c.skip(self.params, device)) for c in self.candidates]


# -- availability --------------------------------------------------------------------------------------------------

def _needs_cpp(op: str):
    def skip(params, device):
        kind = "CUDA" if device.startswith("cuda") else "C++ CPU"
        return None if has_cpp_kernel(op, device.split(":")[0]) else f"no {kind} kernel of hiprune::{op} built"
    return skip


def _needs_gpu_triton(params, device):
    if not device.startswith("cuda"):
        return "Triton runs on the GPU (its CPU interpreter is for tests, not timings)"
    return None if triton_usable("cuda") else "triton not installed"


def _headline_only(params, device):
    # torch.compile costs 20 s to 2 min per shape on a small CPU: only the cases the goals are read from
    return None if params.get("headline") else "torch.compile timed on the headline cases only"


def _memory_limit(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 3
    return 4 * GIB


def backend_label(device: str) -> str:
    return "CUDA op" if device.startswith("cuda") else "C++ op"


@functools.lru_cache(maxsize=None)
def _compiled_reference_select():
    return torch.compile(reference.select, dynamic=False)


# -- selection -----------------------------------------------------------------------------------------------------

def select_candidates(device: str, from_maps: bool) -> list:
    """Selection candidates; x has obj, deep (maps or scores), budget, grid_h, grid_w, prefix."""
    def ours(backend):
        return lambda x: lambda: hiprune_ops.select(x.obj, x.deep, x.budget, x.grid_h, x.grid_w, 0.1, x.prefix,
                                                    backend=backend)

    def loop(x):
        if from_maps:
            return lambda: published.select_from_maps(x.obj, x.deep, x.budget, x.grid_w, x.prefix)
        return lambda: published.select_mask(x.obj, x.deep, x.budget, x.grid_w)

    compiled = _compiled_reference_select
    candidates = [
        Candidate("published loop", loop),
        Candidate("torch reference", ours("torch")),
        Candidate("torch.compile(reference)",
                  lambda x: lambda: compiled()(x.obj, x.deep, x.budget, x.grid_h, x.grid_w, 0.1, x.prefix),
                  _headline_only),
        Candidate(backend_label(device), ours("cpp"), _needs_cpp("select")),
        Candidate("Triton op", ours("triton"), _needs_gpu_triton),
    ]
    if from_maps:
        candidates.insert(0, Candidate("streaming floor (read both maps once)",
                                       lambda x: lambda: x.obj.sum() + x.deep.sum()))
    return candidates


def _check_selection(x: SimpleNamespace, from_maps: bool) -> None:
    """The published loop equals official=True on the same scores (its own reduction, in the maps' dtype, may
    round differently from ours); every backend equals the reference (both bit for bit)."""
    args = (x.obj, x.deep, x.budget, x.grid_h, x.grid_w, 0.1, x.prefix)
    obj, deep = x.obj, x.deep
    if from_maps:
        obj, deep = published.received_attention(obj, x.prefix), published.received_attention(deep, x.prefix)
    mask = published.select_mask(obj, deep, x.budget, x.grid_w)
    official = hiprune_ops.select(obj, deep, x.budget, x.grid_h, x.grid_w, official=True, backend="torch")
    if not torch.equal(published.mask_to_indices(mask), official):
        raise AssertionError("the published loop disagrees with select(official=True)")
    expected = reference.select(*args)
    for backend in ("cpp", "triton"):
        try:
            got = hiprune_ops.select(*args, backend=backend)
        except RuntimeError:  # backend not available here
            continue
        if not torch.equal(got, expected):
            raise AssertionError(f"select backend={backend} disagrees with the reference")


def _maps(batch, heads, length, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, length, length, generator=g), -1).to(device, dtype)


def _scores(rows, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, n, generator=g).to(device), torch.rand(rows, n, generator=g).to(device)


def _select_case(name, params, setup, device, from_maps, baseline):
    return Case("select_maps" if from_maps else "select_scores", name, params, setup,
                select_candidates(device, from_maps), baseline,
                check=lambda x: _check_selection(x, from_maps))


def selection_cases(p: Profile, device: str) -> list:
    cases = []
    grid = p.map_grid
    length = grid * grid + 1
    budget = min(192, grid * grid // 2)
    for batch, dtype in [(b, "float32") for b in p.map_batches] + [(8, d) for d in p.map_dtypes]:
        params = dict(sweep="batch" if dtype == "float32" else "dtype", model="LLaVA-1.5", B=batch, H=16, L=length,
                      grid=f"{grid}x{grid}", budget=budget, dtype=dtype, headline=batch == 8 and dtype == "float32")

        def setup(batch=batch, dtype=getattr(torch, dtype), budget=budget):
            return SimpleNamespace(obj=_maps(batch, 16, length, device, dtype, seed=1),
                                   deep=_maps(batch, 16, length, device, dtype, seed=2),
                                   budget=budget, grid_h=grid, grid_w=grid, prefix=1)
        cases.append(_select_case(f"select_maps/llava-{grid}x{grid}/B{batch}" + ("" if dtype == "float32" else
                                                                                f"/{dtype}"),
                                  params, setup, device, True, "streaming floor (read both maps once)"))

    def scores_case(sweep, model, rows, grid_h, grid_w, budget, label, headline=False, images=None):
        params = dict(sweep=sweep, model=model, B=images or rows, rows=rows, grid=f"{grid_h}x{grid_w}",
                      budget=budget, headline=headline)

        def setup():
            obj, deep = _scores(rows, grid_h * grid_w, device)
            return SimpleNamespace(obj=obj, deep=deep, budget=budget, grid_h=grid_h, grid_w=grid_w, prefix=0)
        return _select_case(f"select_scores/{label}", params, setup, device, False, "published loop")

    small = p.map_grid
    default_budget = min(192, small * small // 2)
    for batch in p.score_batches:
        cases.append(scores_case("batch", "LLaVA-1.5", batch, small, small, default_budget,
                                 f"llava-{small}x{small}/B{batch}/budget{default_budget}",
                                 headline=batch == 32))
    for budget in p.budgets:
        if budget != default_budget or p.budget_batch not in p.score_batches:
            cases.append(scores_case("budget", "LLaVA-1.5", p.budget_batch, small, small, budget,
                                     f"llava-{small}x{small}/B{p.budget_batch}/budget{budget}"))
    tiles = 5  # LLaVA-NeXT: base image + 2x2 tiles, each a 24x24 grid; 640 tokens over the five
    per_tile = max(1, round(small * small * 2 / 9))  # 128 of 576: LLaVA-NeXT's default 640 of 2880
    cases.append(scores_case("grid", "LLaVA-NeXT", p.next_images * tiles, small, small, per_tile,
                             f"llava-next-base+4x{small}x{small}/B{p.next_images}", images=p.next_images))
    for g in p.qwen_grids:
        for ratio in RATIOS:
            budget = max(1, round(ratio * g * g))
            cases.append(scores_case("grid", f"Qwen2.5-VL {ratio:.1%}", 1, g, g, budget,
                                     f"qwen-{g}x{g}/ratio{ratio:.3f}"))
    return cases


# -- scoring -------------------------------------------------------------------------------------------------------

class ScoringInputs:
    """q, k, v (B, H, L, D), scale, prefix; lse (B, H, L) float32, the log-sum-exp of every row of q @ k^T * scale
    (what an SDPA forward can return), computed by blocks of rows when a candidate first needs it."""

    def __init__(self, q, k, v, scale, prefix):
        self.q, self.k, self.v, self.scale, self.prefix = q, k, v, scale, prefix

    @functools.cached_property
    def lse(self):
        q, k, block = self.q, self.k, 1024
        return torch.cat([torch.logsumexp((q[:, :, i:i + block] @ k.transpose(-1, -2)).float() * self.scale, dim=-1)
                          for i in range(0, q.shape[2], block)], dim=2)


def _dense_fits(params, device):
    need = 2 * params["H"] * params["L"] ** 2 * 4
    return None if need <= _memory_limit(device) else f"two (H, L, L) float32 maps need {need / GIB:.0f} GiB"


def _qk_scores_with_lse(x):
    lse = x.lse  # what the attention forward returns beside its output: not part of the timed call
    return lambda: hiprune_ops.qk_scores(x.q, x.k, x.scale, x.prefix, lse=lse)


def scoring_candidates(device: str) -> list:
    """Scoring candidates on ScoringInputs x (q, k, v, scale, prefix, lse)."""
    return [
        Candidate("SDPA forward", lambda x: lambda: F.scaled_dot_product_attention(x.q, x.k, x.v)),
        Candidate("qk_scores (two passes)", lambda x: lambda: hiprune_ops.qk_scores(x.q, x.k, x.scale, x.prefix)),
        Candidate("qk_scores with lse (one pass)", _qk_scores_with_lse),
        Candidate("qk_scores (two passes, Triton)",
                  lambda x: lambda: hiprune_ops.qk_scores(x.q, x.k, x.scale, x.prefix, backend="triton"),
                  _needs_gpu_triton),
        Candidate("dense softmax map + attention_scores",
                  lambda x: lambda: hiprune_ops.attention_scores(
                      torch.softmax(x.q @ x.k.transpose(-1, -2) * x.scale, dim=-1), x.prefix), _dense_fits),
    ]


def scoring_cases(p: Profile, device: str) -> list:
    cases = []
    for length in p.score_lengths:
        params = dict(sweep="L", B=1, H=p.score_heads, L=length, D=p.score_dim, dtype="float32")

        def setup(length=length):
            g = torch.Generator().manual_seed(length)
            q, k, v = (torch.randn(1, p.score_heads, length, p.score_dim, generator=g).to(device) for _ in range(3))
            scale = p.score_dim ** -0.5
            return ScoringInputs(q, k, v, scale, prefix=1)

        def check(x):
            got = hiprune_ops.qk_scores(x.q, x.k, x.scale, x.prefix)
            expected = hiprune_ops.attention_scores(torch.softmax(x.q @ x.k.transpose(-1, -2) * x.scale, -1),
                                                    x.prefix) if x.q.shape[2] <= 4096 else got
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(_qk_scores_with_lse(x)(), got, rtol=1e-4, atol=1e-7)

        cases.append(Case("scoring", f"scoring/L{length}", params, setup, scoring_candidates(device),
                          "SDPA forward", check=check))
    return cases


# -- end to end ----------------------------------------------------------------------------------------------------

def _e2e_candidates(versions_of: Callable[[SimpleNamespace], dict], names) -> list:
    return [Candidate(name, lambda x, name=name: versions_of(x)[name]) for name in names]


E2E_NAMES = ("plain SDPA, no pruning", "ours (SDPA + qk_scores + select)", "published recipe (eager maps + loop)")


def encoder_cases(p: Profile, device: str) -> list:
    from . import models

    cases = []

    @functools.lru_cache(maxsize=1)
    def clip():
        return models.clip_encoder(device, p.clip["overrides"])

    for batch in p.clip["batches"]:
        def setup(batch=batch):
            encoder = clip()
            size = encoder.config.image_size
            pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(device)
            budget = (size // encoder.config.patch_size) ** 2 // 3
            return SimpleNamespace(versions=models.clip_versions(encoder, pixels, budget))

        config = models.clip_config(p.clip["overrides"])
        grid = config.image_size // config.patch_size
        params = dict(model="CLIP-L/14-336" if not p.clip["overrides"] else "CLIP (small)", B=batch,
                      layers=config.num_hidden_layers, width=config.hidden_size, tokens=grid * grid + 1,
                      budget=grid * grid // 3, dtype="float32")
        cases.append(Case("encoder", f"encoder/clip/B{batch}", params, setup,
                          _e2e_candidates(lambda x: x.versions, E2E_NAMES + (models.PROMPT_CANDIDATE,)),
                          E2E_NAMES[0], heavy=True))

    q = p.qwen

    def qwen_setup():
        tower = models.qwen_tower(device, q["overrides"])
        pixels, grid_thw = models.qwen_inputs(tower, q["grid"], q["grid"], device)
        return SimpleNamespace(versions=models.qwen_versions(tower, pixels, grid_thw))

    qconfig = models.qwen_config(q["overrides"])
    params = dict(model="Qwen2.5-VL-7B tower" if not q["overrides"].get("hidden_size") else "Qwen2.5-VL (small)",
                  B=1, layers=qconfig.depth, width=qconfig.hidden_size, patches=q["grid"] ** 2,
                  merged=(q["grid"] // 2) ** 2, ratio=0.334, dtype="float32")
    cases.append(Case("encoder", f"encoder/qwen/{q['grid']}x{q['grid']}", params, qwen_setup,
                      _e2e_candidates(lambda x: x.versions, E2E_NAMES), E2E_NAMES[0], heavy=True))
    return cases


def prefill_cases(p: Profile, device: str) -> list:
    from . import models

    cfg = p.llava
    state = {}

    def setup():
        if "model" not in state:
            state["model"] = models.llava_reduced(device, cfg["lm"], cfg["vision"])
        model = state["model"]
        return SimpleNamespace(model=model, inputs=models.llava_prompt(model, cfg["text_tokens"], device))

    vision = models.clip_config(cfg["vision"])
    n = (vision.image_size // vision.patch_size) ** 2
    lm = models.llama_config(cfg["lm"])
    candidates = [Candidate(f"{budget or n} visual tokens" + ("" if budget else " (unpruned)"),
                            lambda x, budget=budget: lambda: models.prefill(x.model, x.inputs, budget))
                  for budget in cfg["budgets"]]
    params = dict(model="LLaVA-1.5 (reduced depth)", lm_layers=lm.num_hidden_layers, lm_width=lm.hidden_size,
                  vision_layers=vision.num_hidden_layers, text_tokens=cfg["text_tokens"], dtype="float32")
    return [Case("prefill", "prefill/llava", params, setup, candidates, candidates[0].name, heavy=True)]


# -- HiPrune++ --------------------------------------------------------------------------------------------------

PROMPT_BETA = 0.1


def _prompt_reference_fits(params, device):
    # the reference holds the features in float64 and one product of them: 16 bytes per element
    need = 16 * params["B"] * params["N"] * params["C"]
    return None if need <= _memory_limit(device) else f"the float64 reference needs {need / GIB:.1f} GiB"


def _needs_maps(params, device):
    return None if params["maps"] else "this model's selection runs on merged-token scores, not on maps"


def _prompt_check(x: SimpleNamespace) -> None:
    """Every backend's prompt_select equals the reference's, bit for bit."""
    expected = reference.prompt_select(x.features, x.prompt, x.indices, x.roles, x.extra)
    for backend in ("cpp", "triton"):
        try:
            got = hiprune_ops.prompt_select(x.features, x.prompt, x.indices, x.roles, PROMPT_BETA, backend=backend)
        except RuntimeError:  # backend not available here
            continue
        if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
            raise AssertionError(f"prompt_select backend={backend} disagrees with the reference")


def prompt_candidates(device: str) -> list:
    """HiPrune++'s added cost against HiPrune's select on the same images; x from prompt_cases' setup."""
    def prompt_op(backend):
        return lambda x: lambda: hiprune_ops.prompt_select(x.features, x.prompt, x.indices, x.roles, PROMPT_BETA,
                                                           backend=backend)

    return [
        Candidate("select from scores", lambda x: lambda: hiprune_ops.select(x.obj, x.deep, x.budget, x.grid, x.grid,
                                                                             0.1)),
        Candidate("select from maps", lambda x: lambda: hiprune_ops.select(
            x.obj_maps, x.deep_maps, x.budget, x.grid, x.grid, 0.1, x.prefix), _needs_maps),
        Candidate(f"prompt_select {backend_label(device)}", prompt_op("cpp"), _needs_cpp("prompt_select")),
        Candidate("prompt_select Triton op", prompt_op("triton"), _needs_gpu_triton),
        Candidate("prompt_select torch reference", prompt_op("torch"), _prompt_reference_fits),
    ]


def prompt_cases(p: Profile, device: str) -> list:
    cases = []
    for model, grid, prefix, channels, budgets in p.prompt["models"]:
        n = grid * grid
        for budget in budgets:
            for batch in p.prompt["batches"]:
                extra = hiprune_ops.prompt_extra_count(budget, n, PROMPT_BETA)
                params = dict(model=model, B=batch, N=n, C=channels, budget=budget, extra=extra, dtype="float32",
                              maps=prefix > 0)

                def setup(batch=batch, n=n, grid=grid, prefix=prefix, channels=channels, budget=budget,
                          extra=extra):
                    g = torch.Generator().manual_seed(n + budget + batch)
                    obj, deep = _scores(batch, n, device, seed=batch)
                    indices, roles = hiprune_ops.select_with_roles(obj, deep, budget, grid, grid, 0.1)
                    x = SimpleNamespace(obj=obj, deep=deep, budget=budget, grid=grid, prefix=prefix,
                                        indices=indices, roles=roles, extra=extra,
                                        features=torch.randn(batch, n, channels, generator=g).to(device),
                                        prompt=torch.randn(batch, channels, generator=g).to(device))
                    if prefix:
                        x.obj_maps = _maps(batch, 16, n + prefix, device, seed=1)
                        x.deep_maps = _maps(batch, 16, n + prefix, device, seed=2)
                    return x

                cases.append(Case("prompt_select", f"prompt_select/{model.split('-')[0].lower()}-N{n}-C{channels}/"
                                  f"budget{budget}/B{batch}", params, setup, prompt_candidates(device),
                                  "select from scores", check=_prompt_check))
    return cases


def all_cases(profile: str, device: str) -> list:
    p = PROFILES[profile]
    return (selection_cases(p, device) + scoring_cases(p, device) + prompt_cases(p, device)
            + encoder_cases(p, device) + prefill_cases(p, device))


def select_cases(cases: list, only: Optional[str]) -> list:
    """The cases whose name contains `only` (all when None); a clear error when none matches."""
    if only is None:
        return cases
    chosen = [case for case in cases if only in case.name]
    if not chosen:
        groups = sorted({case.group for case in cases})
        raise ValueError(f"--only {only!r} matches no case; case names start with one of {groups}")
    return chosen


def flops_table(visual_tokens=(576, 192, 128, 64), text_tokens: int = 64) -> list:
    """Analytic prefill FLOPs of LLaVA-1.5-7B's language model: (visual tokens, TFLOPs, speed-up vs 576)."""
    from . import models

    full = models.llava_7b_prefill_flops(visual_tokens[0], text_tokens)
    return [(v, models.llava_7b_prefill_flops(v, text_tokens) / 1e12,
             full / models.llava_7b_prefill_flops(v, text_tokens)) for v in visual_tokens]

