"""HiPrune for vLLM's Idefics3ForConditionalGeneration (SigLIP-style tower, pixel_shuffle connector).

Geometry: families.IDEFICS3, as in the transformers integration: no prefix token, pixel_shuffle by the config's
scale_factor (one token per s x s group of patches: the scores are averaged the same way), object layer
round(depth * 9 / 24), deep layer the last, ratio 1/3. An image is sub-image tiles plus the global image, each
owning image_seq_len placeholders after its own marker tokens; the budget counts per tile.
Processor: each image's kept count per tile goes into its inputs; in its prompt every tile's run of placeholders
shrinks to that count, the markers (<fake_token_around_image>, <row_i_col_j>, <global-img>, newlines) stay.
Encoder: every tile is scored and selected on its own shuffled grid; the projected features are gathered at the
kept indices, tile after tile (HiPrune++: each tile's kept + extra tokens for its image's prompt, as
apply_hiprune). Positions are 1-D: the shorter prompt is recompacted, as in transformers.
Tensor parallelism: the tower's heads are sharded; the partial scores are summed over the ranks as for the other
towers (_vllm_api.tp_all_reduce reads the sharding from the tapped attention's heads).
Refused per request, as apply_hiprune refuses it: a tile with padded patches (a pixel_attention_mask with zeros
inside a real tile): vLLM's tower attends to them unmasked, transformers' masks them.
SmolVLM (SmolVLMForConditionalGeneration, a subclass of Idefics3's classes in vLLM, its own processing info) is the
same binding: only its scale_factor differs (4: a 4 x 4 group of patches per token), read from its config.
"""

from __future__ import annotations

from .. import families
from ..selection import merge_scores
from ._common import TiledModelMixin, TiledProcessorMixin, shrink_runs
from vllm.model_executor.models.idefics3 import (Idefics3DummyInputsBuilder, Idefics3ForConditionalGeneration,
                                                 Idefics3MultiModalProcessor, Idefics3ProcessingInfo)
from vllm.model_executor.models.smolvlm import SmolVLMForConditionalGeneration, SmolVLMProcessingInfo
from vllm.multimodal import MULTIMODAL_REGISTRY


class HiPruneIdefics3MultiModalProcessor(TiledProcessorMixin, Idefics3MultiModalProcessor):
    geometry = families.IDEFICS3
    tiles_field, tile_tokens_attr, image_end_attr = "num_patches", "image_seq_len", "fake_image_token"
    prompt_aware = True

    def _shortened(self, full, token: int, kept: int, item) -> list[int]:
        return shrink_runs(full, token, kept)  # every tile's run; its markers stay


@MULTIMODAL_REGISTRY.register_processor(HiPruneIdefics3MultiModalProcessor, info=Idefics3ProcessingInfo,
                                        dummy_inputs=Idefics3DummyInputsBuilder)
class HiPruneIdefics3ForConditionalGeneration(TiledModelMixin, Idefics3ForConditionalGeneration):
    geometry = families.IDEFICS3
    architecture = "Idefics3ForConditionalGeneration"
    prompt_aware = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = self.config.vision_config
        layers = self.model.vision_model.encoder.layers
        self.hiprune_bind(settings, [layer.self_attn for layer in layers], len(layers), vision.num_attention_heads,
                          self.config)
        self.hiprune_grid = vision.image_size // vision.patch_size
        self.hiprune_merge = self.geometry.merge_of(self.config)
        self.hiprune_per_tile = self.model.image_seq_len
        # Every tile has the same tokens: a budget above them is refused now, not per request.
        settings.keep_count(self.hiprune_per_tile, default_ratio=self.geometry.default_ratio)

    # Override of Idefics3ForConditionalGeneration._process_image_input; checked: vllm 0.32.0.
    def _process_image_input(self, image_input):
        keep = self.hiprune_pending_keep(image_input)
        if keep is None:
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
        return self.hiprune_select_tiles(features, merge_scores(object_scores, size, size, k).unbind(0),
                                         merge_scores(deep_scores, size, size, k).unbind(0), (size // k, size // k),
                                         keep, tiles, self._hiprune_prompts)


# vLLM's SmolVLM processor is Idefics3's with SmolVLM's processing info: so is ours.
@MULTIMODAL_REGISTRY.register_processor(HiPruneIdefics3MultiModalProcessor, info=SmolVLMProcessingInfo,
                                        dummy_inputs=Idefics3DummyInputsBuilder)
class HiPruneSmolVLMForConditionalGeneration(HiPruneIdefics3ForConditionalGeneration, SmolVLMForConditionalGeneration):
    architecture = "SmolVLMForConditionalGeneration"
