"""HiPrune inside vLLM: a general plugin for the families in SUPPORTED_ARCHITECTURES (pip install hiprune-ops[vllm]).

    LLM(model, hf_overrides={"hiprune": {"budget": 192}})            # or: vllm serve M --hf-overrides '{...}'
    llm.generate({"prompt": ..., "multi_modal_data": {"image": img},
                  "mm_processor_kwargs": {"hiprune_budget": 64}})    # this request only; 0 or 1.0: no pruning

vLLM calls `register` in every process it starts (entry point group "vllm.general_plugins"). It registers our
subclasses under vLLM's own architecture names (SUPPORTED_ARCHITECTURES). Without a server default (hf_overrides
"hiprune" or HIPRUNE_BUDGET) and without a per-request value, they run exactly vLLM's code. Keys of the "hiprune"
dict: those of apply_hiprune (budget or ratio, video_budget or video_ratio where the binding prunes videos, alpha,
object_layer, deep_layer, neighborhood, official, prompt_beta where it adds HiPrune++ prompt tokens), with the same
rules (settings.py); the per-request keys are settings.REQUEST_KEYS. What a binding cannot prune with (vLLM options
such as EVS or the encoder CUDA graph, a checkpoint layout it cannot follow) stops the engine at start only with a
server default, naming the reason; without one the model is vLLM's own and a request's hiprune_* value is refused
(_common.prepare_vllm_config).

Every other multimodal architecture vLLM ships is pointed at refusal.py: vLLM's own class, which fails engine
start when a HiPrune setting is given (it would prune nothing), naming the covered architectures.

Importing this package does not import vLLM; register() does, lazily by module path.
"""

from __future__ import annotations

_MODELS = {
    "LlavaForConditionalGeneration": "hiprune_ops.integrations.vllm.llava:HiPruneLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "hiprune_ops.integrations.vllm.qwen2_vl:HiPruneQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration":
        "hiprune_ops.integrations.vllm.qwen2_5_vl:HiPruneQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "hiprune_ops.integrations.vllm.qwen3_vl:HiPruneQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration":
        "hiprune_ops.integrations.vllm.qwen3_vl:HiPruneQwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration": "hiprune_ops.integrations.vllm.qwen3_5:HiPruneQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration":
        "hiprune_ops.integrations.vllm.qwen3_5:HiPruneQwen3_5MoeForConditionalGeneration",
    "Glm4vForConditionalGeneration": "hiprune_ops.integrations.vllm.glm4v:HiPruneGlm4vForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration": "hiprune_ops.integrations.vllm.glm4v:HiPruneGlm4vMoeForConditionalGeneration",
    "InternVLForConditionalGeneration":
        "hiprune_ops.integrations.vllm.internvl:HiPruneInternVLForConditionalGeneration",
    "Idefics3ForConditionalGeneration":
        "hiprune_ops.integrations.vllm.idefics3:HiPruneIdefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration": "hiprune_ops.integrations.vllm.idefics3:HiPruneSmolVLMForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "hiprune_ops.integrations.vllm.gemma3:HiPruneGemma3ForConditionalGeneration",
    "PaliGemmaForConditionalGeneration":
        "hiprune_ops.integrations.vllm.paligemma:HiPrunePaliGemmaForConditionalGeneration",
    "LlavaNextForConditionalGeneration":
        "hiprune_ops.integrations.vllm.llava_next:HiPruneLlavaNextForConditionalGeneration",
    "Mistral3ForConditionalGeneration":
        "hiprune_ops.integrations.vllm.mistral3:HiPruneMistral3ForConditionalGeneration",
    "Gemma4ForConditionalGeneration": "hiprune_ops.integrations.vllm.gemma4:HiPruneGemma4ForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration":
        "hiprune_ops.integrations.vllm.llava_onevision:HiPruneLlavaOnevisionForConditionalGeneration",
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def register() -> None:
    """Registers the HiPrune model classes with vLLM's ModelRegistry (the plugin's entry point), and the refusing
    classes for the multimodal architectures without a binding."""
    from vllm import ModelRegistry

    from ._vllm_api import is_vllm_own, multimodal_architectures

    for architecture, target in _MODELS.items():
        ModelRegistry.register_model(architecture, target)
    for architecture in multimodal_architectures():
        if architecture not in _MODELS and is_vllm_own(ModelRegistry, architecture):
            ModelRegistry.register_model(architecture, f"{__name__}.refusal:{architecture}")


__all__ = ["register", "SUPPORTED_ARCHITECTURES"]
