"""The Qwen-style binding for vLLM, shared by Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V / 4.5V.

Processor: each image gets its kept count of placeholders (a budget above an image's merged tokens keeps them all);
each video slice (temporal_patch_size frames: one tower segment) its kept count of video placeholders, vLLM's
markers between them (Qwen3-VL's and GLM's timestamps and frame starts / ends) untouched.
Encoder: the object and deep blocks' q and k are scored in vLLM's packed ViT attention (qk_scores with the blocks'
own cu_seqlens); the patch scores are averaged over each 2x2 merge unit and put in raster order
(qwen_positions.merged_raster_scores, with the window index of Qwen2.5-VL's windows; Qwen2-VL runs in raster
order); the selection step picks the kept merged tokens of each image and of each video slice on its own grid, as
apply_hiprune does. HiPrune++ (prompt_beta): each image and each video slice gets its extra tokens
(_common.ProcessorMixin writes their counts), ranked on the merged features at the language model's width
(Qwen3-VL's deepstack levels follow in the same rows and are gathered with them).

M-RoPE positions, without vLLM's video-pruning machinery (which needs video_pruning_rate and is off in vLLM's CPU
runner): get_mrope_input_positions, run when a request arrives, gives the text its unpruned positions and each
pruned item's placeholders the item's origin plus, per video slice, the slice's t offset (slices keep equal counts,
in order). The encoder returns each pruned item's kept (h, w) offsets with its embeddings, in trailing channels
that hold the offsets' int32 bits (exact through vLLM's encoder cache and chunking). embed_input_ids strips them
and forward adds them to the origin. So every kept token has its original position, and the text after an item
keeps its own. Not supported with the plugin: pipeline parallelism (later stages would not see the offsets), EVS
video pruning (video_pruning_rate), the FlashInfer ViT backend (it rewrites cu_seqlens).
A family binding: `class HiPrune<X>Processor(QwenProcessorMixin, <vLLM's processor>)` and
`class HiPrune<X>(QwenModelMixin, <vLLM's model>)` with `geometry`, `architecture` and, when the tower reorders its
merge units, `window_index`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..qwen_positions import MediaItem, kept_grid_offsets, merged_raster_scores, mrope_positions
from . import _vllm_api
from ._common import (ModelMixin, ProcessorMixin, evs_refusal, flashinfer_refusal, item_kept_count, keep_counts,
                      pipeline_refusal, prompt_inputs)
from .scores import pack_scores, score_channels, unpack_scores
from .settings import KEEP_FIELDS


# vLLM's ModelConfig -> why the plugin cannot prune it (processor and model: _common.first_reason).
REFUSALS = (evs_refusal, flashinfer_refusal)


class QwenProcessorMixin(ProcessorMixin):
    video_pruned = True
    config_refusals = REFUSALS
    prompt_aware = video_prompt_aware = True

    def _video_slice_counts(self, processed) -> list[tuple[int, int]]:
        grid_thw = processed.get("video_grid_thw")
        if grid_thw is None:
            return []
        merge = self.geometry.merge_of(self.info.get_hf_config().vision_config)
        return [(int(g[0]), int(g[1] * g[2]) // (merge * merge)) for g in grid_thw]

    def _video_item_slices(self, item) -> int:
        return int(item["video_grid_thw"].data[0])

    def _image_token_counts(self, processed) -> list[int]:
        grid_thw = processed.get("image_grid_thw")
        if grid_thw is None:
            return []
        merge = self.geometry.merge_of(self.info.get_hf_config().vision_config)
        return [int(g.prod()) // (merge * merge) for g in grid_thw]


class _ScoredVisual:
    """The tower as vLLM's data-parallel runner calls it, returning embeddings with both layers' scores packed in
    trailing channels, so they are gathered with the embeddings and the selection runs after the gather."""

    def __init__(self, model: "QwenModelMixin"):
        self.model = model
        visual = model.visual
        self.spatial_merge_size = visual.spatial_merge_size
        self.out_hidden_size = visual.out_hidden_size + score_channels(visual.dtype)

    def parameters(self):
        return self.model.visual.parameters()

    def __call__(self, pixel_values, grid_thw):
        embeddings, object_scores, deep_scores = self.model._scored_visual(pixel_values, grid_thw)
        return pack_scores(embeddings, [object_scores, deep_scores])


class QwenModelMixin(ModelMixin):
    video_pruned = True
    config_refusals = REFUSALS
    engine_refusals = ModelMixin.engine_refusals + (pipeline_refusal,)
    packed_tower = True
    prompt_aware = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision_config = self.config.vision_config
        self.hiprune_bind(settings, [block.attn for block in self.visual.blocks], len(self.visual.blocks),
                          vision_config.num_heads, vision_config)
        self.hiprune_width = self.hiprune_embedding_width()
        self._hiprune_keep: dict[str, Optional[list[int]]] = {}
        self._hiprune_prompts: dict = {}  # per modality, HiPrune++ fields of this encoder call's items (prompt_inputs)
        self._hiprune_pending = None

    def hiprune_embedding_width(self) -> int:
        """Channels of vLLM's own image embeddings (the language model's width; Qwen3-VL adds its deepstack
        levels): wider ones carry the kept tokens' M-RoPE offsets."""
        return self.config.get_text_config().hidden_size

    def hiprune_media(self, input_tokens, mm_features) -> list[tuple[int, int, int, int, float, object]]:
        """(offset, t, h, w, t_factor, feature) per media item in prompt order, merged grids (vLLM's
        iter_mm_grid_thw; checked: vllm 0.32.0)."""
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        return [(*grid, feature) for feature, grid in zip(features, self.iter_mm_grid_thw(mm_features))]

    def window_index(self, t: int, h: int, w: int) -> torch.Tensor:
        """The raster index of each merge unit of one item in the order the tower runs them: raster order itself
        unless the family's tower reorders (Qwen2.5-VL's windows)."""
        merge = self.visual.spatial_merge_size
        return torch.arange(t * (h // merge) * (w // merge))

    # -- encoder -------------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs):
        self._hiprune_keep = {modality: keep_counts(kwargs, KEEP_FIELDS[modality]) for modality in ("image", "video")}
        self._hiprune_prompts = {modality: prompt_inputs(kwargs, modality) for modality in ("image", "video")}
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._hiprune_keep, self._hiprune_prompts = {}, {}

    def _scored_visual(self, pixel_values, grid_thw):
        """(merged embeddings in raster order, object scores, deep scores), scores per merged token."""
        visual = self.visual
        embeddings, sums = self.hiprune_taps.scored(lambda: visual(pixel_values, grid_thw=grid_thw))
        window, start = [], 0
        for t, h, w in grid_thw:
            window.append(self.window_index(int(t), int(h), int(w)) + start)
            start += int(t) * (int(h) // visual.spatial_merge_size) * (int(w) // visual.spatial_merge_size)
        window_index = torch.cat(window)
        unit = visual.spatial_merge_size ** 2
        object_scores, deep_scores = (merged_raster_scores(s, window_index, unit) for s in sums)
        return embeddings, object_scores, deep_scores

    # Overrides of Qwen2VLForConditionalGeneration._process_image_input / _process_video_input (and those of
    # Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.1V); checked: vllm 0.32.0.
    def _process_image_input(self, image_input):
        pruned = self._hiprune_items("image", image_input)
        return super()._process_image_input(image_input) if pruned is None else pruned

    def _process_video_input(self, video_input):
        pruned = self._hiprune_items("video", video_input)
        return super()._process_video_input(video_input) if pruned is None else pruned

    def _hiprune_items(self, modality: str, media_input) -> Optional[tuple]:
        """Per image or video, its kept embeddings with their (h, w) offsets in trailing channels (the t offset of a
        video slice is known from the prompt: get_mrope_input_positions gives it); None when nothing is pruned."""
        keep = self._hiprune_keep.get(modality)  # per item: tokens kept per temporal slice
        pixel_key = {"image": "pixel_values", "video": "pixel_values_videos"}[modality]
        grid_thw = media_input[f"{modality}_grid_thw"].tolist()
        merge = self.visual.spatial_merge_size
        planes = [(h // merge) * (w // merge) for _, h, w in grid_thw]
        if keep is None or media_input["type"] != pixel_key or all(k >= n for k, n in zip(keep, planes)):
            return None
        if len(keep) != len(grid_thw):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(grid_thw)} {modality} items")
        pixel_values = media_input[pixel_key]
        if self.use_data_parallel:
            gathered = _vllm_api.run_data_parallel_tower(_ScoredVisual(self), pixel_values, grid_thw)
            per_item = [unpack_scores(item) for item in gathered]
        else:
            embeddings, object_scores, deep_scores = self._scored_visual(pixel_values, grid_thw)
            counts = [t * n for (t, _, _), n in zip(grid_thw, planes)]
            per_item = [(e, [o, d]) for e, o, d in zip(embeddings.split(counts), object_scores.split(counts),
                                                      deep_scores.split(counts))]
        # Every temporal slice is an item of its own on its merged grid (an image is one slice), as apply_hiprune.
        slices = [(i, s) for i, (t, _, _) in enumerate(grid_thw) for s in range(t)]
        spans = {(i, s): slice(s * planes[i], (s + 1) * planes[i]) for i, s in slices}
        grids = {i: (h // merge, w // merge) for i, (_, h, w) in enumerate(grid_thw)}
        prompts = self._hiprune_prompts.get(modality)
        if prompts is not None:  # per item -> per slice: a video's slices share its prompt and extra count
            prompts = tuple([values[i] for i, _ in slices] for values in prompts)
        width = self.config.get_text_config().hidden_size  # Qwen3-VL's deepstack levels follow: not ranked
        features = None if prompts is None else [per_item[i][0][spans[i, s], :width] for i, s in slices]
        indices = self.hiprune_select([per_item[i][1][0][spans[i, s]] for i, s in slices],
                                      [per_item[i][1][1][spans[i, s]] for i, s in slices],
                                      [grids[i] for i, _ in slices], [keep[i] for i, _ in slices],
                                      features=features, prompts=prompts)
        out = []
        for i, (embeddings, _) in enumerate(per_item):
            kept = [index for (item, _), index in zip(slices, indices) if item == i]
            if kept[0] is None:
                out.append(embeddings)
                continue
            rows = torch.cat([index + spans[i, s].start for s, index in enumerate(kept)])
            offsets = torch.cat([kept_grid_offsets(index, *grids[i]) for index in kept], dim=1)
            out.append(self._with_offsets(embeddings[rows], offsets))
        return tuple(out)

    @staticmethod
    def _with_offsets(embeddings: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        bits = offsets.to(torch.int32).t().contiguous().view(embeddings.dtype)
        return torch.cat([embeddings, bits.to(embeddings.device)], dim=1)

    # -- positions -----------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        items, offsets, pruned = [], [], False
        for offset, t, h, w, t_factor, feature in self.hiprune_media(input_tokens, mm_features):
            full = t * h * w
            kept = item_kept_count(feature.data, feature.modality)
            per_slice = h * w if kept is None else min(h * w, kept)
            pruned |= per_slice < h * w
            items.append(MediaItem(offset, t, h, w, t * per_slice, t_factor))
            # A pruned item: each slice's t offset here, its kept tokens' (h, w) offsets from the encoder (forward).
            index = torch.arange(full) if per_slice == h * w else torch.arange(t).repeat_interleave(per_slice) * h * w
            offsets.append(kept_grid_offsets(index, h, w, t_factor))
        if not pruned:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        return mrope_positions(len(input_tokens), items, offsets)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._hiprune_pending = None
        # vLLM's own model (hiprune_unsupported): its embeddings may carry channels of vLLM's (EVS's positions).
        if (self.hiprune_unsupported is not None or multimodal_embeddings is None
                or len(multimodal_embeddings) == 0):
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)
        width = self.hiprune_width
        plain, offsets, carried = [], [], False
        for embedding in multimodal_embeddings:
            if embedding.shape[-1] == width:
                plain.append(embedding)
                offsets.append(torch.zeros(3, embedding.shape[0], dtype=torch.int64, device=embedding.device))
                continue
            carried = True
            plain.append(_vllm_api.copy_modality(embedding, embedding[:, :width]))
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
