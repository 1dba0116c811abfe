"""HiPrune for vLLM's Mistral3ForConditionalGeneration (Pixtral tower, 2 x 2 patch merger).

Geometry: families.MISTRAL3, as in the transformers integration (hf/pixtral.py): every image at its own size, packed
in one sequence with cu_seqlens (the tap scores each image as its segment); scores averaged over each 2 x 2 merge
group like the features; object layer round(depth * 9 / 24) of the full tower, deep layer the one feeding the
projector; a budget counts per image, clamped to it. apply_hiprune keeps every row marker ([IMG_BREAK], [IMG_END])
and the kept [IMG] tokens in their rows; which row a kept token sits in is known only after the tower ran, while vLLM
writes the prompt before. So a pruned image's run is written as its kept count of [IMG], then its row markers, and
the whole run takes embeddings: the encoder returns, row by row, the row's kept tokens and then the marker's own
text embedding. The language model gets exactly apply_hiprune's sequence; the prompt ids show the markers last.
Positions are 1-D (recompacted). Refused with the plugin: the FlashInfer ViT backend (it rewrites cu_seqlens).
"""

from __future__ import annotations

import torch

from .. import families
from ..selection import merge_scores
from . import _vllm_api
from ._common import ModelMixin, ProcessorMixin, flashinfer_refusal, keep_counts, kept_count_of
from vllm.model_executor.models.mistral3 import (Mistral3DummyInputsBuilder, Mistral3ForConditionalGeneration,
                                                 Mistral3MultiModalProcessor, Mistral3ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

ROW_MARKERS_FIELD = "hiprune_row_markers"  # per image: the ids of [IMG_BREAK] and [IMG_END]
REFUSALS = (flashinfer_refusal,)  # processor and model (_common.first_reason)


def merged_grid(config, height: int, width: int) -> tuple[int, int]:
    unit = config.vision_config.patch_size * config.spatial_merge_size
    return int(height) // unit, int(width) // unit


class HiPruneMistral3MultiModalProcessor(ProcessorMixin, Mistral3MultiModalProcessor):
    geometry = families.MISTRAL3
    config_refusals = REFUSALS

    def _image_token_counts(self, processed) -> list[int]:
        if processed.get("pixel_values") is None:
            return []
        config = self.info.get_hf_config()
        counts = [h * w for h, w in (merged_grid(config, *size) for size in processed["image_sizes"])]
        processor = self.info.get_hf_processor()
        vocab = self.info.get_tokenizer().get_vocab()
        markers = [vocab[processor.image_break_token], vocab[processor.image_end_token]]
        processed[ROW_MARKERS_FIELD] = torch.tensor([markers] * len(counts), dtype=torch.int64)
        return counts

    # Override of BaseMultiModalProcessor._get_mm_fields_config (ProcessorMixin's, plus the row markers); checked:
    # vllm 0.32.0.
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if ROW_MARKERS_FIELD in hf_inputs:
            fields[ROW_MARKERS_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    # Override of BaseMultiModalProcessor._get_prompt_updates, in place of ProcessorMixin's (the row markers stay,
    # and the whole run of a pruned image takes embeddings); checked: vllm 0.32.0.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super(ProcessorMixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs,
                                                                       out_mm_kwargs))
        token = self.info.get_hf_config().image_token_index
        for i, update in enumerate(updates):
            if update.modality != "image":
                continue

            def replacement(item_idx: int, original=update.content):
                details = original(item_idx)
                kept = kept_count_of(out_mm_kwargs, item_idx)
                tokens = details.full.count(token)
                if kept is None or kept >= tokens:
                    return details
                return PromptUpdateDetails.from_seq([token] * kept + [t for t in details.full if t != token])

            updates[i] = PromptReplacement(modality="image", target=update.target, replacement=replacement)
        return updates


@MULTIMODAL_REGISTRY.register_processor(HiPruneMistral3MultiModalProcessor, info=Mistral3ProcessingInfo,
                                        dummy_inputs=Mistral3DummyInputsBuilder)
class HiPruneMistral3ForConditionalGeneration(ModelMixin, Mistral3ForConditionalGeneration):
    geometry = families.MISTRAL3
    architecture = "Mistral3ForConditionalGeneration"
    config_refusals = REFUSALS
    packed_tower = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        layers = self.vision_tower.transformer.layers
        self.hiprune_bind(settings, [layer.attention for layer in layers], len(layers),
                          config.vision_config.num_attention_heads, config,
                          full_depth=config.vision_config.num_hidden_layers)

    def embed_multimodal(self, **kwargs):
        keep = keep_counts(kwargs)
        markers = kwargs.pop(ROW_MARKERS_FIELD, None)
        image_input = _vllm_api.parse_image_input(self, dict(kwargs))
        if image_input is None or keep is None or image_input["type"] != "pixel_values_pixtral":
            return super().embed_multimodal(**kwargs)
        pixel_values = image_input["pixel_values"]
        sizes = [(image.shape[-2], image.shape[-1]) for image in pixel_values]
        merged = [merged_grid(self.config, h, w) for h, w in sizes]
        if all(k >= h * w for k, (h, w) in zip(keep, merged)):
            return super().embed_multimodal(**kwargs)
        features, scores = self.hiprune_taps.scored(lambda: self.vision_tower(pixel_values))
        m = self.config.spatial_merge_size
        patches = [h * w * m * m for h, w in merged]
        object_scores, deep_scores = ([merge_scores(s.reshape(1, -1), h * m, w * m, m)[0]
                                       for s, (h, w) in zip(layer.split(patches), merged)] for layer in scores)
        indices = self.hiprune_select(object_scores, deep_scores, merged, keep)
        embeddings = self.multi_modal_projector(torch.cat(features), sizes).split([h * w for h, w in merged])
        out = []
        for image, index, (h, w), ids in zip(embeddings, indices, merged, markers):
            if index is None:
                out.append(image)
                continue
            break_id, end_id = (int(t) for t in torch.as_tensor(ids).reshape(-1))
            marker = self.embed_input_ids(torch.tensor([break_id, end_id], device=image.device)).to(image.dtype)
            rows = []
            for row in range(h):
                rows += [image[index[index // w == row]], marker[1:] if row == h - 1 else marker[:1]]
            out.append(torch.cat(rows))
        return out
