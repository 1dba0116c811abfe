"""Multimodal architectures the plugin does not cover: vLLM's own class, refusing a HiPrune setting at start.

Without this, `hf_overrides={"hiprune": {...}}` (or HIPRUNE_BUDGET) on such a model would start the engine and prune
nothing, without a word. register() points every multimodal architecture vLLM ships that has no binding here at
`refusal:<architecture>`: a subclass of vLLM's own class, generated on first use, that
- without a HiPrune setting is vLLM's class (its constructor and processor run unchanged);
- with one, fails engine start (when vLLM builds the processor, and again when it builds the model) with an error
  naming the architecture and listing the covered ones.
A per-request hiprune_* value on such a model fails that request (the processor refuses it).
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from . import _vllm_api
from .settings import HiPruneSettings, request_hiprune_keys


def refusal_message(architecture: str) -> str:
    from . import SUPPORTED_ARCHITECTURES

    return (f"hiprune: {architecture} is not covered by the HiPrune vLLM plugin, so a HiPrune setting would prune "
            f"nothing; covered architectures: {', '.join(SUPPORTED_ARCHITECTURES)}. Remove the 'hiprune' setting "
            "(hf_overrides, HIPRUNE_BUDGET) to run the model unpruned, or use apply_hiprune in transformers.")


def _check(architecture: str, hf_config: Any) -> None:
    if HiPruneSettings.from_hf_config(hf_config).enabled:
        raise NotImplementedError(refusal_message(architecture))


def _refusing_class(architecture: str) -> type:
    module_name, class_name = _vllm_api.multimodal_architectures()[architecture]
    parent = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        _check(architecture, vllm_config.model_config.hf_config)
        parent.__init__(self, vllm_config=vllm_config, prefix=prefix)

    namespace = {"__init__": __init__, "__module__": __name__, "__qualname__": architecture}
    cls = type(architecture, (parent,), namespace)
    factories = getattr(parent, "_processor_factory", None)
    if factories is not None:
        from vllm.multimodal import MULTIMODAL_REGISTRY

        def build_processor(info, dummy_inputs):
            _check(architecture, info.get_hf_config())
            return refuse_request_keys(factories.processor(info, dummy_inputs), refusal_message(architecture))

        cls = MULTIMODAL_REGISTRY.register_processor(build_processor, info=factories.info,
                                                     dummy_inputs=factories.dummy_inputs)(cls)
    return cls


def refuse_request_keys(processor, reason: str):
    """vLLM's own processor, refusing with `reason` any request that carries a hiprune_* value (it would be dropped,
    or confuse the Hugging Face processor)."""
    # Override of BaseMultiModalProcessor._apply_hf_processor_main on this instance; checked: vllm 0.32.0.
    original = processor._apply_hf_processor_main

    def call(mm_items, hf_kwargs: Mapping[str, object], *args, **kwargs):
        ours = request_hiprune_keys(hf_kwargs)
        if ours:
            raise ValueError(f"mm_processor_kwargs: {', '.join(ours)}: {reason}")
        return original(mm_items, hf_kwargs, *args, **kwargs)

    processor._apply_hf_processor_main = call
    return processor


def __getattr__(name: str):
    if name.startswith("__") or name not in _vllm_api.multimodal_architectures():
        raise AttributeError(name)
    cls = _refusing_class(name)
    globals()[name] = cls
    return cls


__all__ = ["refusal_message", "refuse_request_keys"]
