"""HiPrune for vLLM's Gemma4ForConditionalGeneration (images, and videos frame by frame).

Geometry: families.GEMMA4, as in the transformers integration (hf/gemma4.py): each image is resized to its own patch
grid (H, W), padded to a fixed number of patches ((-1, -1) positions at padding), run through the tower behind a
key-padding mask, and pooled k x k by position into (H / k) * (W / k) soft tokens (70 to 1120 on released
checkpoints); object layer round(depth * 9 / 24), deep layer the last; ratio 1/3 by default, a budget clamped to
each image's soft tokens.
vLLM 0.32.0 builds this tower from transformers' own module (replicated on every tensor-parallel rank), so the
scores come from transformers' capture (capture.SlotScores), the one apply_hiprune uses: softmax over the real keys,
mean over the real queries, padding left out. A pruned request's images run through vLLM's own tower, pooler and
projector one image at a time (one tower call each, so each layer records one call), their patch scores are put
on the image's grid by position, pooled k x k like the features (the selection step's merge) and the kept soft
tokens gathered: the same tokens apply_hiprune keeps for the same pixels. Processor: the run of soft-token
placeholders between <start_of_image> and <end_of_image> shrinks to the kept count. Positions are 1-D
(recompacted); the bidirectional image block follows the placeholders.
Videos: vLLM 0.32.0 makes every frame an image of its own (at most 70 soft tokens), each with its timestamp and its
run of video placeholders between <start_of_image> and <end_of_image>; every frame is pruned as an image, keeping
`video_budget` / `video_ratio` of its soft tokens (default: the image setting), as apply_hiprune does, and its run
shrinks to that count.
HiPrune++ (prompt_beta): an image's run, and each video frame's, holds its kept count plus its extra tokens
(prompt_extra_count of the frame's kept and soft tokens), the not-kept soft tokens (as the language model receives
them: the projector's output) most similar to the prompt's mean text embedding, as apply_hiprune ranks them per
image and per frame.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import families
from ..capture import SlotScores
from ._common import ProcessorMixin, StashedKeepModelMixin, shrunk_image_updates, tile_prompts
from vllm.model_executor.models.gemma4_mm import (Gemma4DummyInputsBuilder, Gemma4ForConditionalGeneration,
                                                  Gemma4MultiModalProcessor, Gemma4ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

POSITIONS = "pixel_position_ids"  # vLLM's name of the processor's image_position_ids
VIDEO_POSITIONS = "pixel_position_ids_videos"  # vLLM's: every frame's, frame after frame
VIDEO_SOFT_TOKENS = "video_num_soft_tokens"


def soft_token_counts(config, positions: torch.Tensor) -> tuple[list[tuple[int, int]], list[int]]:
    """(patch grid, soft tokens) per image, from its patch positions."""
    k = families.GEMMA4.merge_of(config)
    grids = families.position_grids(positions, k, POSITIONS)
    return grids, [(h // k) * (w // k) for h, w in grids]


class HiPruneGemma4MultiModalProcessor(ProcessorMixin, Gemma4MultiModalProcessor):
    geometry = families.GEMMA4
    video_pruned = True
    prompt_aware = video_prompt_aware = True

    def _image_token_counts(self, processed) -> list[int]:
        positions = processed.get(POSITIONS)
        if processed.get("pixel_values") is None or positions is None:
            return []
        return soft_token_counts(self.info.get_hf_config(), positions)[1]

    def _video_slice_counts(self, processed) -> list[tuple[int, int]]:
        # Checked: vllm 0.32.0, Gemma4MultiModalProcessor writes video_num_soft_tokens (per video, per frame).
        counts = processed.get(VIDEO_SOFT_TOKENS)
        if counts is None:
            return []
        videos = []
        for frames in counts:
            frames = [int(n) for n in frames]
            if len(set(frames)) != 1:
                raise RuntimeError(f"hiprune: a video's frames have different soft-token counts {sorted(set(frames))}")
            videos.append((len(frames), frames[0]))
        return videos

    def _video_item_slices(self, item) -> int:
        return int(item["video_frame_counts"].data)

    def _video_embed_token(self) -> int:
        return self.info.get_hf_processor().video_token_id

    # Override of BaseMultiModalProcessor._get_prompt_updates, in place of ProcessorMixin's (the image's run of
    # placeholders keeps its <start_of_image> / <end_of_image> markers, a video's its timestamps and markers per
    # frame); checked: vllm 0.32.0.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        updates = super(ProcessorMixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        updates = shrunk_image_updates(updates, out_mm_kwargs, self.info.get_hf_config().image_token_id)
        return [PromptReplacement(modality="video", target=update.target,
                                  replacement=self._video_replacement(update.replacement, out_mm_kwargs))
                if update.modality == "video" else update for update in updates]


@MULTIMODAL_REGISTRY.register_processor(HiPruneGemma4MultiModalProcessor, info=Gemma4ProcessingInfo,
                                        dummy_inputs=Gemma4DummyInputsBuilder)
class HiPruneGemma4ForConditionalGeneration(StashedKeepModelMixin, Gemma4ForConditionalGeneration):
    geometry = families.GEMMA4
    architecture = "Gemma4ForConditionalGeneration"
    video_pruned = True
    prompt_aware = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        layers = self.vision_tower.encoder.layers
        chosen = self.hiprune_layers(settings, len(layers), self.config)
        self.hiprune_attention = [layers[layer - 1].self_attn for layer in chosen]
        self.hiprune_merge = self.geometry.merge_of(self.config)

    # Override of Gemma4ForConditionalGeneration._process_image_input (vLLM's tower, pooler and projector over a
    # request's images -> per image its soft tokens); checked: vllm 0.32.0.
    def _process_image_input(self, image_input) -> list[torch.Tensor]:
        pruned = self._hiprune_frames(image_input["pixel_values"], image_input[POSITIONS], self._hiprune_keep,
                                      self._hiprune_prompts)
        return super()._process_image_input(image_input) if pruned is None else pruned

    # Override of Gemma4ForConditionalGeneration._process_video_input (every frame through the same tower, pooler
    # and projector -> per video its frames' soft tokens, frame after frame); checked: vllm 0.32.0.
    def _process_video_input(self, video_input) -> list[torch.Tensor]:
        keep, frames = self._hiprune_video_keep, video_input["video_frame_counts"]
        frames = [int(n) for n in (frames.tolist() if isinstance(frames, torch.Tensor) else frames)]
        if keep is not None and len(keep) != len(frames):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(frames)} videos")
        per_frame = None if keep is None else [k for k, count in zip(keep, frames) for _ in range(count)]
        pruned = self._hiprune_frames(video_input["pixel_values_videos"], video_input[VIDEO_POSITIONS], per_frame,
                                      tile_prompts(self._hiprune_video_prompts, frames))
        if pruned is None:
            return super()._process_video_input(video_input)
        starts = [sum(frames[:i]) for i in range(len(frames))]
        return [torch.cat(pruned[start:start + count]) for start, count in zip(starts, frames)]

    def _hiprune_frames(self, pixel_values, positions, keep, prompts=None) -> Optional[list[torch.Tensor]]:
        """Per image (or video frame), its kept soft tokens: each run alone through vLLM's image path, its scores
        pooled like its features; None when nothing is pruned (keep None, or every count whole). prompts: the
        images' (frames') HiPrune++ fields (prompt_inputs), their extra tokens ranked on the soft tokens."""
        if keep is None:
            return None
        grids, counts = soft_token_counts(self.config, positions)
        if len(keep) != len(counts):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(counts)} images")
        if all(k >= n for k, n in zip(keep, counts)):
            return None
        if self.hiprune_unsupported is not None:  # an engine refusal, which the processor could not see
            raise ValueError(self.hiprune_unsupported)
        capture = SlotScores(self.hiprune_attention, [self.hiprune_object_layer, self.hiprune_deep_layer]).attach()
        try:
            embeddings, object_scores, deep_scores = [], [], []
            for i, grid in enumerate(grids):
                single = {"pixel_values": pixel_values[i:i + 1], POSITIONS: positions[i:i + 1]}
                (embedding,), scores = capture.scored(lambda: super(HiPruneGemma4ForConditionalGeneration,
                                                                    self)._process_image_input(single))
                embeddings.append(embedding)
                # vLLM pads further at the end with tower LoRA on (to its longest image): those scores go.
                length = positions[i].shape[0]
                image_scores = [families.raster_by_position(s[0, :length], positions[i], grid) for s in scores]
                object_scores.append(image_scores[0])
                deep_scores.append(image_scores[1])
        finally:
            capture.detach()
        indices = self.hiprune_select(object_scores, deep_scores, grids, keep, merge=self.hiprune_merge,
                                      features=None if prompts is None else embeddings, prompts=prompts)
        return [e if index is None else e[index] for e, index in zip(embeddings, indices)]
