"""HiPrune for vLLM's Idefics3ForConditionalGeneration (SigLIP-style tower, pixel_shuffle connector).

Geometry: families.IDEFICS3, as in the transformers integration: no prefix token, pixel_shuffle by the config's
scale_factor (one token per s x s group of patches: the scores are averaged the same way), object layer
round(depth * 9 / 24), deep layer the last, ratio 1/3. An image is sub-image tiles plus the global image, each
owning image_seq_len placeholders after its own marker tokens; the budget counts per tile.
Processor: each image's kept count per tile goes into its inputs; in its prompt every tile's run of placeholders
shrinks to that count, the markers (<fake_token_around_image>, <row_i_col_j>, <global-img>, newlines) stay.
Encoder: every tile is scored and selected on its own shuffled grid; the projected features are gathered at the
kept indices, tile after tile. Positions are 1-D: the shorter prompt is recompacted, as in transformers.
Tensor parallelism: the tower's heads are sharded and vLLM's attention module keeps no tp_size, so the sharding is
read from its heads per partition; the partial scores are summed over the ranks as for the other towers.
Refused per request, as apply_hiprune refuses it: a tile with padded patches (a pixel_attention_mask with zeros
inside a real tile): vLLM's tower attends to them unmasked, transformers' masks them.
SmolVLM (a subclass in vLLM) is not bound: its processor could not be built in the test environment.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import families
from ..selection import merge_scores
from . import _vllm_api
from ._common import ModelMixin, ProcessorMixin, keep_counts, kept_count_of
from vllm.model_executor.models.idefics3 import (Idefics3DummyInputsBuilder, Idefics3ForConditionalGeneration,
                                                 Idefics3MultiModalProcessor, Idefics3ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails


def shrink_runs(ids: list[int], token: int, kept: int) -> list[int]:
    """ids with every run of `token` cut to its first `kept` (one run per tile; the markers between stay)."""
    out, run = [], 0
    for t in ids:
        run = run + 1 if t == token else 0
        if t != token or run <= kept:
            out.append(t)
    return out


class HiPruneIdefics3MultiModalProcessor(ProcessorMixin, Idefics3MultiModalProcessor):
    geometry = families.IDEFICS3

    def _image_token_counts(self, processed) -> list[int]:
        """Tokens per tile (every tile and the global image has the same): the kept count written is per tile."""
        num_patches = processed.get("num_patches")
        if num_patches is None:
            return []
        return [self.info.get_hf_processor().image_seq_len] * len(num_patches)

    # Override of BaseMultiModalProcessor._get_prompt_updates (vLLM's Idefics3 one, not the mixin's, whose plain run
    # of placeholders would drop the tile markers); checked: vllm 0.32.0.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super(ProcessorMixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs,
                                                                         out_mm_kwargs))
        per_tile = self.info.get_hf_processor(**hf_processor_mm_kwargs).image_seq_len
        for i, update in enumerate(updates):
            if update.modality != "image":
                continue
            original, token = update.replacement, update.target[0]

            def replacement(item_idx: int, original=original, token=token):
                details = original(item_idx)
                kept = kept_count_of(out_mm_kwargs, item_idx)
                if kept is None or kept >= per_tile:
                    return details
                return PromptUpdateDetails.select_token_id(shrink_runs(details.full, token, kept), token)

            updates[i] = PromptReplacement(modality="image", target=update.target, replacement=replacement)
        return updates


@MULTIMODAL_REGISTRY.register_processor(HiPruneIdefics3MultiModalProcessor, info=Idefics3ProcessingInfo,
                                        dummy_inputs=Idefics3DummyInputsBuilder)
class HiPruneIdefics3ForConditionalGeneration(ModelMixin, Idefics3ForConditionalGeneration):
    geometry = families.IDEFICS3
    architecture = "Idefics3ForConditionalGeneration"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = self.config.vision_config
        layers = self.model.vision_model.encoder.layers
        self.hiprune_bind(settings, [layer.self_attn for layer in layers], len(layers), vision.num_attention_heads,
                          self.config)
        attention = layers[0].self_attn
        if attention.num_heads_per_partition != attention.num_heads:  # heads sharded (mm_encoder_tp_mode "weights")
            shards = SimpleNamespace(tp_size=attention.num_heads // attention.num_heads_per_partition)
            self.hiprune_taps.all_reduce = _vllm_api.tp_all_reduce(shards)
        self.hiprune_grid = vision.image_size // vision.patch_size
        self.hiprune_merge = self.geometry.merge_of(self.config)
        self.hiprune_per_tile = self.model.image_seq_len
        self._hiprune_keep = None
        # Every tile has the same tokens: a budget above them is refused now, not per request.
        settings.keep_count(self.hiprune_per_tile, default_ratio=self.geometry.default_ratio)

    def embed_multimodal(self, **kwargs):
        self._hiprune_keep = keep_counts(kwargs)
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._hiprune_keep = None

    # Override of Idefics3ForConditionalGeneration._process_image_input; checked: vllm 0.32.0.
    def _process_image_input(self, image_input):
        keep = self._hiprune_keep
        if (keep is None or image_input["type"] != "pixel_values"
                or all(k >= self.hiprune_per_tile for k in keep)):
            return super()._process_image_input(image_input)
        tiles = [int(n) for n in image_input["num_patches"]]
        if len(keep) != len(tiles):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(tiles)} images")
        pixel_values, mask = image_input["pixel_values"], image_input["pixel_attention_mask"]
        real = (pixel_values != 0).flatten(1).any(-1)  # vLLM drops all-zero (padding) tiles
        if not bool(mask[real].bool().all()):
            raise ValueError(f"hiprune: {self.architecture} with padded tiles (pixel_attention_mask) is not "
                             "supported: vLLM's tower attends to the padding, transformers' masks it")
        features, (object_scores, deep_scores) = self.hiprune_taps.scored(
            lambda: self.model.connector(self.model.image_pixels_to_features(pixel_values, mask)))
        size, k = self.hiprune_grid, self.hiprune_merge
        tile_keep = [n for n, count in zip(keep, tiles) for _ in range(count)]
        indices = self.hiprune_select(merge_scores(object_scores, size, size, k).unbind(0),
                                      merge_scores(deep_scores, size, size, k).unbind(0),
                                      [(size // k, size // k)] * len(tile_keep), tile_keep)
        kept = [tile if index is None else tile[index] for tile, index in zip(features, indices)]
        per_image, start = [], 0
        for count in tiles:
            per_image.append(torch.cat(kept[start:start + count]))
            start += count
        return per_image
