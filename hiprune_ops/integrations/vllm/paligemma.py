"""HiPrune for vLLM's PaliGemmaForConditionalGeneration, and the SigLIP-grid binding Gemma 3 shares (gemma3.py).

Geometry: families.PALIGEMMA / GEMMA3, as in the transformers integration (hf/paligemma.py, hf/gemma3.py): a SigLIP
tower, every tile (an image, or a Gemma 3 pan-and-scan crop) of one fixed patch grid, then a k x k average pool
(Gemma 3) or none (PaliGemma, k = 1); object layer round(depth * 9 / 24), deep layer the last (vLLM builds the
whole tower). Processor: every run of the image's placeholder token, one per tile, shrinks to the kept count per
tile; the markers around it stay. Encoder: the object and deep layers' q and k are scored in vLLM's SigLIP
attention, the patch scores pooled k x k like the features, the selection step picks each tile's kept tokens out of
the projector's output. Positions are 1-D (recompacted); the bidirectional image block follows the placeholders.
HiPrune++: every tile gets its extra tokens for its image's prompt, ranked on the projector's output, and its run
of placeholders holds kept + extra (as apply_hiprune). PaliGemma's prompt text has no placeholder (vLLM inserts the
image tokens before it and a newline after it): the text rule reads that prompt, the one apply_hiprune sees.
"""

from __future__ import annotations

import torch

from .. import families
from ..selection import merge_scores
from . import _vllm_api
from ._common import ModelMixin, ProcessorMixin, keep_counts, prompt_inputs, shrunk_image_updates
from vllm.model_executor.models.paligemma import (PaliGemmaDummyInputsBuilder, PaliGemmaForConditionalGeneration,
                                                  PaliGemmaMultiModalProcessor, PaliGemmaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


def tokens_per_tile(geometry: families.Geometry, config) -> int:
    side = config.vision_config.image_size // config.vision_config.patch_size
    return (side // geometry.merge_of(config)) ** 2


class SiglipGridProcessorMixin(ProcessorMixin):
    """Subclasses define _tiles(processed) -> tiles per image (the kept count written is per tile)."""

    prompt_aware = True

    def _image_token_counts(self, processed) -> list[int]:
        if processed.get("pixel_values") is None:
            return []
        config = self.info.get_hf_config()
        return [tokens_per_tile(self.geometry, config)] * len(self._tiles(processed))

    # Override of BaseMultiModalProcessor._get_prompt_updates, in place of ProcessorMixin's (these placeholder texts
    # keep their markers and take one run per tile; PaliGemma's is an insertion); checked: vllm 0.32.0.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super(ProcessorMixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        return shrunk_image_updates(updates, out_mm_kwargs, self.info.get_hf_config().image_token_index)


class SiglipGridModelMixin(ModelMixin):
    """Subclasses define, of vLLM's parsed image input, _tiles -> tiles per image and _pixels -> (tiles, 3, H, W),
    and _embed_tiles(pixel_values) -> (tiles, tokens, D): vLLM's own tower and projector call."""

    prompt_aware = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        layers = self.vision_tower.vision_model.encoder.layers
        self.hiprune_bind(settings, [layer.self_attn for layer in layers], len(layers),
                          config.vision_config.num_attention_heads, config)
        self.hiprune_side = config.vision_config.image_size // config.vision_config.patch_size
        self.hiprune_merge = self.geometry.merge_of(config)
        self.hiprune_tokens = tokens_per_tile(self.geometry, config)
        # Every tile has the same tokens: a budget above them is refused now, not per request.
        settings.keep_count(self.hiprune_tokens, default_ratio=self.geometry.default_ratio)

    def embed_multimodal(self, **kwargs):
        keep = keep_counts(kwargs)
        prompts = prompt_inputs(kwargs)
        image_input = _vllm_api.parse_image_input(self, dict(kwargs))
        if (image_input is None or keep is None or image_input["type"] != "pixel_values"
                or all(k >= self.hiprune_tokens for k in keep)):
            return super().embed_multimodal(**kwargs)  # vLLM's own path: nothing to prune
        tiles, pixel_values = self._tiles(image_input), self._pixels(image_input)
        embeddings, scores = self.hiprune_taps.scored(lambda: self._embed_tiles(pixel_values))
        side, k = self.hiprune_side, self.hiprune_merge
        object_scores, deep_scores = (merge_scores(s.reshape(len(embeddings), -1), side, side, k).unbind(0)
                                      for s in scores)
        return self.hiprune_select_tiles(embeddings, object_scores, deep_scores, (side // k, side // k), keep, tiles,
                                         prompts)


class HiPrunePaliGemmaMultiModalProcessor(SiglipGridProcessorMixin, PaliGemmaMultiModalProcessor):
    geometry = families.PALIGEMMA

    def _tiles(self, processed) -> list[int]:
        return [1] * len(processed["pixel_values"])

    def _prompt_text_ids(self, prompt_ids):
        # vLLM inserts the image tokens before the prompt (its text holds no placeholder) and ends it with "\n"
        # (PaliGemmaMultiModalProcessor.apply; checked: vllm 0.32.0): the text rule reads that prompt.
        newline = self.info.get_tokenizer().get_vocab()["\n"]
        ids = [self.info.get_hf_config().image_token_index, *prompt_ids]
        return super()._prompt_text_ids(ids if ids[-1] == newline else ids + [newline])


@MULTIMODAL_REGISTRY.register_processor(HiPrunePaliGemmaMultiModalProcessor, info=PaliGemmaProcessingInfo,
                                        dummy_inputs=PaliGemmaDummyInputsBuilder)
class HiPrunePaliGemmaForConditionalGeneration(SiglipGridModelMixin, PaliGemmaForConditionalGeneration):
    geometry = families.PALIGEMMA
    architecture = "PaliGemmaForConditionalGeneration"

    def _tiles(self, image_input) -> list[int]:
        return [1] * len(image_input["data"])

    def _pixels(self, image_input) -> torch.Tensor:
        return image_input["data"]

    def _embed_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # As PaliGemmaForConditionalGeneration._image_pixels_to_features, then its projector.
        features = self.vision_tower(pixel_values.to(dtype=self.vision_tower.get_input_embeddings().weight.dtype))
        return self.multi_modal_projector(features)
