"""What the LLaVA and Qwen2.5-VL subclasses share inside vLLM (imports vLLM: loaded by register() only)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from .scores import QKTap, finish_scores
from .settings import HIPRUNE_KEEP_FIELD, HiPruneSettings, strip_request_keys


def logger():
    from vllm.logger import init_logger
    return init_logger("hiprune_ops.integrations.vllm")


def prepare_vllm_config(vllm_config, model_name: str) -> HiPruneSettings:
    """The server default, and the vLLM features that cannot run with the q/k taps, turned off or refused.

    Called before the parent constructor builds the tower, so a compiled encoder is never built.
    """
    settings = HiPruneSettings.from_hf_config(vllm_config.model_config.hf_config)
    compilation = vllm_config.compilation_config
    if getattr(compilation, "compile_mm_encoder", False):
        compilation.compile_mm_encoder = False
        logger().warning("hiprune: compile_mm_encoder turned off for %s (the q/k taps run eagerly)", model_name)
    if getattr(compilation, "cudagraph_mm_encoder", False):
        raise ValueError(f"hiprune: {model_name} with cudagraph_mm_encoder=True is not supported (a replayed "
                         "encoder graph skips the q/k taps); turn the encoder CUDA graph off")
    return settings


def tp_all_reduce(attn_module) -> Optional[Any]:
    """A sum over the tensor-parallel group when this tower's heads are sharded across ranks, else None."""
    if getattr(attn_module, "tp_size", 1) <= 1:
        return None
    from vllm.distributed import tensor_model_parallel_all_reduce
    return tensor_model_parallel_all_reduce


class TowerTaps:
    """The object and deep layer taps of one tower, and their TP-reduced scores."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], total_heads: int, all_reduce,
                 num_prefix: int = 0):
        self.taps = [QKTap(module, num_prefix) for module in attention_modules]
        self.total_heads = total_heads
        self.all_reduce = all_reduce

    def arm(self) -> None:
        for tap in self.taps:
            tap.arm()

    def disarm(self) -> None:
        for tap in self.taps:
            tap.armed = False
            tap.sums = []

    def take(self) -> list[torch.Tensor]:
        return [finish_scores(tap.take(), self.total_heads, self.all_reduce) for tap in self.taps]


def keep_counts(kwargs: dict) -> Optional[list[int]]:
    """Pops the per-image kept counts the processor wrote; None for inputs that did not go through it."""
    keep = kwargs.pop(HIPRUNE_KEEP_FIELD, None)
    if keep is None:
        return None
    if isinstance(keep, (list, tuple)):
        keep = torch.stack([torch.as_tensor(k) for k in keep])
    return [int(k) for k in keep.reshape(-1).tolist()]


class ProcessorMixin:
    """Writes each image's kept count into its inputs, where the prompt update and the encoder both read it.

    Subclasses define _image_token_counts(processed) -> full token count per image, and clamp_budget.
    """

    clamp_budget = False

    def _hiprune_settings(self, mm_kwargs: Mapping[str, object]) -> HiPruneSettings:
        return HiPruneSettings.from_hf_config(self.info.get_hf_config()).for_request(mm_kwargs)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        settings = self._hiprune_settings(hf_kwargs)  # a bad request value fails here, for this request only
        processed = super()._call_hf_processor(hf_data, strip_request_keys(hf_kwargs))
        counts = self._image_token_counts(processed)
        if counts:
            processed[HIPRUNE_KEEP_FIELD] = torch.tensor(
                [settings.keep_count(n, clamp=self.clamp_budget) for n in counts], dtype=torch.int64)
        return processed

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[HIPRUNE_KEEP_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


def kept_count_of(out_mm_kwargs, item_idx: int) -> Optional[int]:
    """The kept count the processor wrote for image item_idx, or None (image embeddings given directly)."""
    item = out_mm_kwargs["image"][item_idx]
    field = item.get(HIPRUNE_KEEP_FIELD) if hasattr(item, "get") else None
    return None if field is None else int(field.data)
