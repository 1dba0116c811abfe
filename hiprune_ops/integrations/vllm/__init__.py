"""HiPrune inside vLLM: a general plugin for LLaVA-1.5 and Qwen2.5-VL (pip install hiprune-ops[vllm]).

    LLM(model, hf_overrides={"hiprune": {"budget": 192}})            # or: vllm serve M --hf-overrides '{...}'
    llm.generate({"prompt": ..., "multi_modal_data": {"image": img},
                  "mm_processor_kwargs": {"hiprune_budget": 64}})    # this request only; 0 or 1.0: no pruning

vLLM calls `register` in every process it starts (entry point group "vllm.general_plugins"). It registers our
subclasses under vLLM's own architecture names, LlavaForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration. Without a server default (hf_overrides "hiprune" or HIPRUNE_BUDGET) and without
a per-request value, they run exactly vLLM's code. Keys of the "hiprune" dict: those of apply_hiprune (budget or
ratio, alpha, object_layer, deep_layer, neighborhood, official).

Importing this package does not import vLLM; register() does, lazily by module path.
"""

from __future__ import annotations

_MODELS = {
    "LlavaForConditionalGeneration": "hiprune_ops.integrations.vllm.llava:HiPruneLlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration":
        "hiprune_ops.integrations.vllm.qwen2_5_vl:HiPruneQwen2_5_VLForConditionalGeneration",
    "Glm4vForConditionalGeneration": "hiprune_ops.integrations.vllm.glm4v:HiPruneGlm4vForConditionalGeneration",
    "Glm4vMoeForConditionalGeneration": "hiprune_ops.integrations.vllm.glm4v:HiPruneGlm4vMoeForConditionalGeneration",
    "InternVLForConditionalGeneration":
        "hiprune_ops.integrations.vllm.internvl:HiPruneInternVLForConditionalGeneration",
    "Idefics3ForConditionalGeneration":
        "hiprune_ops.integrations.vllm.idefics3:HiPruneIdefics3ForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "hiprune_ops.integrations.vllm.gemma3:HiPruneGemma3ForConditionalGeneration",
    "PaliGemmaForConditionalGeneration":
        "hiprune_ops.integrations.vllm.paligemma:HiPrunePaliGemmaForConditionalGeneration",
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def register() -> None:
    """Registers the HiPrune model classes with vLLM's ModelRegistry (the plugin's entry point)."""
    from vllm import ModelRegistry

    for architecture, target in _MODELS.items():
        ModelRegistry.register_model(architecture, target)


__all__ = ["register", "SUPPORTED_ARCHITECTURES"]
