"""HiPrune for vLLM's Gemma3ForConditionalGeneration: the SigLIP-grid binding (paligemma.py) with the projector's
k x k average pool (families.GEMMA3: k from the config, 4 at 896 px).

Each image and each of its pan-and-scan crops is a tile with its own run of mm_tokens_per_image placeholders
between <start_of_image> and <end_of_image>: the budget counts kept tokens per tile, as apply_hiprune's does
(HiPrune++: each tile's kept + extra tokens). The prompt's image placeholder is <start_of_image>, which vLLM
expands: the prompt text is what follows its expansion.
"""

from __future__ import annotations

import torch

from .. import families
from ._common import expand_placeholder
from .paligemma import SiglipGridModelMixin, SiglipGridProcessorMixin
from vllm.model_executor.models.gemma3_mm import (Gemma3DummyInputsBuilder, Gemma3ForConditionalGeneration,
                                                  Gemma3MultiModalProcessor, Gemma3ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneGemma3MultiModalProcessor(SiglipGridProcessorMixin, Gemma3MultiModalProcessor):
    geometry = families.GEMMA3

    def _tiles(self, processed) -> list[int]:
        return [int(n) for n in processed["num_patches"]]  # the image and its crops

    def _prompt_text_ids(self, prompt_ids):
        # The unexpanded prompt holds <start_of_image> where the expanded one (apply_hiprune's) holds the image's
        # sequence (Gemma3ProcessingInfo.get_image_repl; checked: vllm 0.32.0): the text rule reads the sequence's
        # end, from its last image token on (<end_of_image>, "\n\n").
        config = self.info.get_hf_config()
        sequence = self.info.get_tokenizer().encode(self.info.get_hf_processor().full_image_sequence,
                                                    add_special_tokens=False)
        tail = sequence[len(sequence) - 1 - sequence[::-1].index(config.image_token_index):]
        return super()._prompt_text_ids(expand_placeholder(prompt_ids, config.boi_token_index, tail))


@MULTIMODAL_REGISTRY.register_processor(HiPruneGemma3MultiModalProcessor, info=Gemma3ProcessingInfo,
                                        dummy_inputs=Gemma3DummyInputsBuilder)
class HiPruneGemma3ForConditionalGeneration(SiglipGridModelMixin, Gemma3ForConditionalGeneration):
    geometry = families.GEMMA3
    architecture = "Gemma3ForConditionalGeneration"

    def _tiles(self, image_input) -> list[int]:
        return [int(n) for n in image_input["num_patches"]]

    def _pixels(self, image_input) -> torch.Tensor:
        return image_input["pixel_values"]

    def _embed_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # As Gemma3ForConditionalGeneration._process_image_input, before its split per image.
        return self.multi_modal_projector(self.vision_tower(pixel_values))
