"""Tier 1 of the vLLM plugin's refusals (vllm/_common.py), without vLLM: what the plugin cannot prune stops the engine
at start only with a server default; without one the model is vLLM's own (no taps, its options untouched) and a
request giving a hiprune_* value is refused with the reason. vLLM's configs are stood in for by namespaces holding
the fields the checks read."""

import logging
import re
from types import SimpleNamespace

import pytest
import torch

from hiprune_ops.integrations import families
from hiprune_ops.integrations.vllm import _common
from hiprune_ops.integrations.vllm._common import (ModelMixin, ProcessorMixin, RefusedTaps, cuda_graph_refusal,
                                                   evs_refusal, first_reason, flashinfer_refusal, pipeline_refusal,
                                                   prepare_vllm_config)
from hiprune_ops.integrations.vllm.scores import TowerTaps

ARCH = "TinyForConditionalGeneration"


class MultiModalConfig(SimpleNamespace):
    def is_multimodal_pruning_enabled(self):  # as vLLM's: EVS on when video_pruning_rate is set and positive
        return bool(self.video_pruning_rate)


def model_config(hiprune=None, video_pruning_rate=None, backend=None):
    hf_config = SimpleNamespace() if hiprune is None else SimpleNamespace(hiprune=hiprune)
    return SimpleNamespace(hf_config=hf_config, architecture=ARCH,
                           multimodal_config=MultiModalConfig(video_pruning_rate=video_pruning_rate,
                                                              mm_encoder_attn_backend=backend))


def vllm_config(hiprune=None, cudagraph=False, compile_encoder=True, pipeline=1, **model):
    return SimpleNamespace(model_config=model_config(hiprune, **model),
                           compilation_config=SimpleNamespace(cudagraph_mm_encoder=cudagraph,
                                                              compile_mm_encoder=compile_encoder),
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline))


@pytest.fixture(autouse=True)
def without_vllm(monkeypatch):
    monkeypatch.delenv("HIPRUNE_BUDGET", raising=False)
    monkeypatch.setattr(_common, "logger", lambda: logging.getLogger("hiprune-test"))  # vLLM's logger: not here


def test_each_check_names_the_architecture_and_its_option():
    assert first_reason((evs_refusal, flashinfer_refusal), model_config(), ARCH) is None
    assert "video_pruning_rate" in evs_refusal(model_config(video_pruning_rate=0.5), ARCH)
    assert "FlashInfer" in flashinfer_refusal(model_config(backend="AttentionBackendEnum.FLASHINFER"), ARCH)
    assert flashinfer_refusal(model_config(backend="AttentionBackendEnum.TORCH_SDPA"), ARCH) is None
    assert "cudagraph_mm_encoder" in cuda_graph_refusal(vllm_config(cudagraph=True), ARCH)
    assert "pipeline parallelism" in pipeline_refusal(vllm_config(pipeline=2), ARCH)
    assert cuda_graph_refusal(vllm_config(), ARCH) is None and pipeline_refusal(vllm_config(), ARCH) is None
    both = first_reason((cuda_graph_refusal, pipeline_refusal), vllm_config(cudagraph=True, pipeline=2), ARCH)
    assert both.startswith(f"hiprune: {ARCH} with cudagraph_mm_encoder")  # the first that applies


def test_start_refuses_only_with_a_server_default():
    reason = "hiprune: a reason"
    for server in ({"budget": 8}, {}):  # an empty dict is a server default too (the family's defaults)
        with pytest.raises(NotImplementedError, match="a reason"):
            prepare_vllm_config(vllm_config(server), ARCH, unsupported=reason)
    config = vllm_config()
    assert not prepare_vllm_config(config, ARCH, unsupported=reason).enabled
    assert config.compilation_config.compile_mm_encoder  # vLLM's own: its options untouched
    assert not prepare_vllm_config(config, ARCH).enabled
    assert not config.compilation_config.compile_mm_encoder  # bound: the taps need an eager encoder


def test_environment_budget_is_a_server_default(monkeypatch):
    monkeypatch.setenv("HIPRUNE_BUDGET", "8")
    with pytest.raises(NotImplementedError, match="a reason"):
        prepare_vllm_config(vllm_config(), ARCH, unsupported="hiprune: a reason")


class Attention(torch.nn.Module):
    """Stands in for vLLM's MMEncoderAttention: what hiprune_bind reads of it."""

    def __init__(self, backend="AttentionBackendEnum.TORCH_SDPA"):
        super().__init__()
        self.num_heads, self.attn_backend = 2, backend


class TinyModel(ModelMixin):
    geometry = families.LLAVA
    architecture = ARCH
    engine_refusals = ModelMixin.engine_refusals + (pipeline_refusal,)
    config_refusals = (evs_refusal,)
    packed_tower = True

    def start_and_bind(self, config, backend="AttentionBackendEnum.TORCH_SDPA"):
        settings = self.hiprune_start(config)
        self.layers = [SimpleNamespace(attn=Attention(backend)) for _ in range(4)]
        self.hiprune_bind(settings, self.layers, 4, 2, SimpleNamespace(vision_feature_layer=-1))
        return settings

    def hooked(self) -> int:
        return sum(len(layer.attn._forward_pre_hooks) for layer in self.layers)


@pytest.mark.parametrize("options", [dict(cudagraph=True), dict(pipeline=2), dict(video_pruning_rate=0.5)])
def test_model_without_a_setting_is_vllms_own_and_refuses_pruning(options):
    model = TinyModel()
    model.start_and_bind(vllm_config(**options))
    assert model.hiprune_unsupported is not None
    assert isinstance(model.hiprune_taps, RefusedTaps) and model.hooked() == 0
    with pytest.raises(ValueError, match=re.escape(model.hiprune_unsupported)):
        model.hiprune_taps.scored(lambda: None)
    with pytest.raises(NotImplementedError, match="not supported"):
        TinyModel().start_and_bind(vllm_config({"ratio": 0.5}, **options))


def test_flashinfer_picked_by_vllm_is_found_at_bind():
    model = TinyModel()
    model.start_and_bind(vllm_config(), backend="AttentionBackendEnum.FLASHINFER")
    assert "FlashInfer" in model.hiprune_unsupported and isinstance(model.hiprune_taps, RefusedTaps)
    with pytest.raises(NotImplementedError, match="FlashInfer"):
        TinyModel().start_and_bind(vllm_config({"ratio": 0.5}), backend="AttentionBackendEnum.FLASHINFER")
    supported = TinyModel()
    supported.start_and_bind(vllm_config())
    assert supported.hiprune_unsupported is None and isinstance(supported.hiprune_taps, TowerTaps)
    assert supported.hooked() == 2  # the object and deep layers


class TinyProcessor(ProcessorMixin):
    geometry = families.LLAVA
    config_refusals = (evs_refusal,)

    def __init__(self, config):
        self.info = SimpleNamespace(ctx=SimpleNamespace(model_config=config), get_hf_config=lambda: config.hf_config)


def test_processor_refuses_every_hiprune_value_with_the_reason():
    processor = TinyProcessor(model_config(video_pruning_rate=0.5))
    for request in ({"hiprune_budget": 4}, {"hiprune_ratio": 1.0}, {"hiprune_typo": 1}):
        with pytest.raises(ValueError, match=rf"mm_processor_kwargs: {list(request)[0]}: hiprune: {ARCH} with vLLM's "
                                             r"own video pruning"):
            processor._hiprune_settings(request)
    assert not processor._hiprune_settings({}).enabled  # a plain request: vLLM's own, every token
    assert not processor._hiprune_settings({"max_pixels": 1}).enabled
    allowed = TinyProcessor(model_config())
    assert allowed._hiprune_settings({"hiprune_budget": 4}).keep_count(10) == 4


def test_vllms_own_processor_refuses_hiprune_values_with_the_reason():
    # refusal.py's wrapper: the uncovered architectures', and a Pixtral-style LLaVA's without a setting.
    from hiprune_ops.integrations.vllm.refusal import refuse_request_keys

    class Processor:
        def _apply_hf_processor_main(self, mm_items, hf_kwargs, *args, **kwargs):
            return dict(hf_kwargs)

    processor = refuse_request_keys(Processor(), "hiprune: the reason")
    assert processor._apply_hf_processor_main([], {"max_pixels": 1}) == {"max_pixels": 1}
    with pytest.raises(ValueError, match="mm_processor_kwargs: hiprune_budget, hiprune_ratio: hiprune: the reason"):
        processor._apply_hf_processor_main([], {"hiprune_ratio": 0.5, "hiprune_budget": 1})
