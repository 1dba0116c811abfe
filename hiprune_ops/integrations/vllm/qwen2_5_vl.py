"""HiPrune for vLLM's Qwen2_5_VLForConditionalGeneration (images; videos pass through unpruned).

Processor: each image gets its kept count of placeholders (a budget above an image's merged tokens keeps them all).
Encoder: the object and deep blocks' q and k are scored in vLLM's packed, windowed ViT attention (qk_scores with
the blocks' own cu_seqlens); the patch scores are averaged over each 2x2 merge unit and moved from window order back
to raster order (qwen_positions.merged_raster_scores); `select` picks the kept merged tokens of each image.
Defaults as in the transformers integration: object block = the full-attention block nearest to depth / 2, deep
block = the last.

M-RoPE positions, without vLLM's video-pruning machinery (which needs video_pruning_rate and is off in vLLM's CPU
runner): get_mrope_input_positions, run when a request arrives, gives the text its unpruned positions and each
pruned image's placeholders the image's origin. The encoder returns each pruned image's kept (t, h, w) offsets
with its embeddings, in trailing channels that hold the offsets' int32 bits (exact through vLLM's encoder cache and
chunking). embed_input_ids strips them and forward adds them to the origin. So every kept token has its original
position, and the text after an image keeps its own. Not supported with the plugin: pipeline parallelism (later
stages would not see the offsets), EVS video pruning, the FlashInfer ViT backend (it rewrites cu_seqlens).
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ..qwen_positions import MediaItem, kept_grid_offsets, merged_raster_scores, mrope_positions
from ..towers import resolve_layer
from ._common import ProcessorMixin, TowerTaps, keep_counts, kept_count_of, prepare_vllm_config, tp_all_reduce
from .scores import pack_scores, score_channels, unpack_scores
from .settings import HIPRUNE_KEEP_FIELD
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneQwen2_5_VLMultiModalProcessor(ProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    clamp_budget = True

    def _image_token_counts(self, processed) -> list[int]:
        grid_thw = processed.get("image_grid_thw")
        if grid_thw is None:
            return []
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return [int(g.prod()) // (merge * merge) for g in grid_thw]

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        for i, update in enumerate(updates):
            if update.modality != "image":
                continue
            original, target = update.replacement, update.target
            token = target[0]

            def replacement(item_idx: int, original=original, token=token):
                kept = kept_count_of(out_mm_kwargs, item_idx)
                return original(item_idx) if kept is None else [token] * kept

            updates[i] = PromptReplacement(modality="image", target=target, replacement=replacement)
        return updates


class _ScoredVisual:
    """The tower as vLLM's data-parallel runner calls it, returning embeddings with both layers' scores packed in
    trailing channels, so they are gathered with the embeddings and the selection runs after the gather."""

    def __init__(self, model: "HiPruneQwen2_5_VLForConditionalGeneration"):
        self.model = model
        visual = model.visual
        self.spatial_merge_size = visual.spatial_merge_size
        self.out_hidden_size = visual.out_hidden_size + score_channels(visual.dtype)

    def parameters(self):
        return self.model.visual.parameters()

    def __call__(self, pixel_values, grid_thw):
        embeddings, object_scores, deep_scores = self.model._scored_visual(pixel_values, grid_thw)
        return pack_scores(embeddings, [object_scores, deep_scores])


@MULTIMODAL_REGISTRY.register_processor(HiPruneQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class HiPruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        name = "Qwen2_5_VLForConditionalGeneration"
        settings = prepare_vllm_config(vllm_config, name)
        if vllm_config.model_config.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError(f"hiprune: {name} with video_pruning_rate (EVS) is not supported; use one or the other")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise NotImplementedError(f"hiprune: {name} with pipeline parallelism is not supported (later stages "
                                      "would not get the kept tokens' M-RoPE positions)")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.hiprune_settings = settings
        visual = self.visual
        depth = len(visual.blocks)
        full = [i + 1 for i in visual.fullatt_block_indexes] or [depth]
        default_object = min(full, key=lambda layer: (abs(layer - depth / 2), layer))
        self.hiprune_object_layer = resolve_layer(settings.object_layer, depth, default_object, "object_layer")
        self.hiprune_deep_layer = resolve_layer(settings.deep_layer, depth, depth, "deep_layer")
        attention = [visual.blocks[i - 1].attn for i in (self.hiprune_object_layer, self.hiprune_deep_layer)]
        backend = str(getattr(attention[0].attn, "attn_backend", ""))
        if "FLASHINFER" in backend:
            raise NotImplementedError(f"hiprune: {name} with the FlashInfer ViT attention backend is not supported")
        self.hiprune_taps = TowerTaps([a.attn for a in attention], self.config.vision_config.num_heads,
                                      tp_all_reduce(attention[0]))
        self.hiprune_text_width = self.config.get_text_config().hidden_size
        self._hiprune_keep: Optional[list[int]] = None
        self._hiprune_pending = None
        self.hiprune_last: list = []  # per image of the latest pruned encoder call: kept indices, None if all kept

    # -- encoder -------------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs):
        self._hiprune_keep = keep_counts(kwargs)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._hiprune_keep = None

    def _scored_visual(self, pixel_values, grid_thw):
        """(merged embeddings in raster order, object scores, deep scores), scores per merged token."""
        visual = self.visual
        self.hiprune_taps.arm()
        try:
            embeddings = visual(pixel_values, grid_thw=grid_thw)
            sums = self.hiprune_taps.take()
        finally:
            self.hiprune_taps.disarm()
        window, start = [], 0
        for t, h, w in grid_thw:
            window.append(visual.get_rope_by_thw(int(t), int(h), int(w))[2] + start)
            start += int(t) * (int(h) // visual.spatial_merge_size) * (int(w) // visual.spatial_merge_size)
        window_index = torch.cat(window)
        object_scores, deep_scores = (merged_raster_scores(s, window_index, visual.spatial_merge_unit) for s in sums)
        return embeddings, object_scores, deep_scores

    def _process_image_input(self, image_input):
        keep = self._hiprune_keep
        grid_thw = image_input["image_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        counts = [t * (h // merge) * (w // merge) for t, h, w in grid_thw]
        if keep is None or image_input["type"] != "pixel_values" or all(k >= n for k, n in zip(keep, counts)):
            return super()._process_image_input(image_input)
        if len(keep) != len(counts):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(counts)} images")
        pixel_values = image_input["pixel_values"]
        if self.use_data_parallel:
            from vllm.model_executor.models.vision import run_dp_sharded_mrope_vision_model

            gathered = run_dp_sharded_mrope_vision_model(_ScoredVisual(self), pixel_values, grid_thw,
                                                         rope_type="rope_3d")
            per_image = [unpack_scores(item) for item in gathered]
        else:
            embeddings, object_scores, deep_scores = self._scored_visual(pixel_values, grid_thw)
            per_image = [(e, [o, d]) for e, o, d in zip(embeddings.split(counts), object_scores.split(counts),
                                                       deep_scores.split(counts))]
        s = self.hiprune_settings
        out, self.hiprune_last = [], []
        for (embeddings, (object_scores, deep_scores)), count, (t, h, w) in zip(per_image, keep, grid_thw):
            grid_h, grid_w = t * (h // merge), w // merge
            if count >= grid_h * grid_w:
                out.append(embeddings)
                self.hiprune_last.append(None)
                continue
            indices = ops.select(object_scores[None], deep_scores[None], count, grid_h, grid_w, s.alpha, 0,
                                 s.neighborhood, s.official)[0]
            self.hiprune_last.append(indices)
            offsets = kept_grid_offsets(indices, h // merge, grid_w)
            out.append(self._with_offsets(embeddings[indices], offsets))
        return tuple(out)

    @staticmethod
    def _with_offsets(embeddings: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bits = offsets.to(torch.int32).t().contiguous().view(embeddings.dtype)
        return torch.cat([embeddings, bits.to(embeddings.device)], dim=1)

    # -- positions -----------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        items, offsets, pruned = [], [], False
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            full = t * h * w
            field = feature.data.get(HIPRUNE_KEEP_FIELD) if feature.modality == "image" else None
            kept = full if field is None else min(full, int(field.data))
            pruned |= kept < full
            items.append(MediaItem(offset, t, h, w, kept, t_factor))
            offsets.append(None if kept < full else kept_grid_offsets(torch.arange(full), h, w, t_factor))
        if not pruned:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return mrope_positions(len(input_tokens), items, offsets)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._hiprune_pending = None
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        from vllm.multimodal.utils import copy_mm_embedding_modality

        width = self.hiprune_text_width
        plain, offsets, carried = [], [], False
        for embedding in multimodal_embeddings:
            if embedding.shape[-1] == width:
                plain.append(embedding)
                offsets.append(torch.zeros(3, embedding.shape[0], dtype=torch.int64, device=embedding.device))
                continue
            carried = True
            plain.append(copy_mm_embedding_modality(embedding, embedding[:, :width]))
            offsets.append(embedding[:, width:].contiguous().view(torch.int32).t().to(torch.int64))
        result = super().embed_input_ids(input_ids, plain, is_multimodal=is_multimodal)
        if carried:
            self._hiprune_pending = (is_multimodal.nonzero().squeeze(1), torch.cat(offsets, dim=1))
        return result

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._hiprune_pending = self._hiprune_pending, None
        if pending is not None:
            slots, offsets = pending
            if positions.dim() != 2 or positions.shape[0] != 3 or slots.numel() != offsets.shape[1]:
                raise RuntimeError("hiprune: the kept image tokens' M-RoPE offsets do not match this step's "
                                   f"positions {tuple(positions.shape)}")
            positions = positions.clone()
            positions[:, slots.to(positions.device)] += offsets.to(positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
