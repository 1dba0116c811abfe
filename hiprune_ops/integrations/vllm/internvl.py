"""HiPrune for InternVL 3 / 3.5 in transformers' format (InternVLForConditionalGeneration), which vLLM serves with its
InternS1ForConditionalGeneration (InternS1-ViT tower, pixel_shuffle, MLP projector).

Geometry: families.INTERNVL, as in the transformers integration: CLS first (left out of the scores), pixel_shuffle
0.5 (one token per 2x2 group of patches: the scores are averaged the same way), object layer round(depth * 9 / 24),
deep layer the one feeding the projector (the last: vLLM always feeds it), ratio 1/3. An image is tiles plus a
thumbnail, each owning image_seq_length placeholders between <img> and </img>; the budget counts per tile.
Processor: each image's kept count per tile goes into its inputs; its prompt keeps <img> and </img> around
tiles x kept placeholders. Encoder: every tile is scored and selected on its own shuffled grid, the projected
features are gathered at the kept indices, tile after tile. HiPrune++: every tile gets its extra tokens for its
image's prompt (tiles x (kept + extra) placeholders), ranked on the projected features, as apply_hiprune does.
Positions are 1-D: the shorter prompt is recompacted, as in transformers. Videos pass through unpruned. The tower
is not tensor-parallel in vLLM (every rank runs it whole): the scores need no reduction.
Refused with a HiPrune setting (as apply_hiprune refuses them): downsample_ratio other than 0.5,
vision_feature_select_strategy other than "default", and a vision_feature_layer other than the last (vLLM feeds the
last layer whatever the config says; apply_hiprune would take another).
"""

from __future__ import annotations

from .. import families
from ..selection import merge_scores
from ._common import TiledModelMixin, TiledProcessorMixin
from vllm.model_executor.models.interns1 import (InternS1DummyInputsBuilder, InternS1ForConditionalGeneration,
                                                 InternS1MultiModalProcessor, InternS1ProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

ARCHITECTURE = "InternVLForConditionalGeneration"


def unsupported(config) -> str | None:
    """Why this checkpoint cannot be pruned as apply_hiprune prunes it, or None."""
    depth = config.vision_config.num_hidden_layers
    if config.downsample_ratio != 0.5:
        return (f"hiprune: {ARCHITECTURE} with downsample_ratio={config.downsample_ratio} is not supported (0.5 is: "
                "each language-model token is a 2x2 group of patches)")
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        return (f"hiprune: {ARCHITECTURE} is supported with vision_feature_select_strategy='default' (the CLS "
                "token dropped before pixel_shuffle)")
    if families.projector_layer(getattr(config, "vision_feature_layer", -1), depth) != depth:
        return (f"hiprune: {ARCHITECTURE} with vision_feature_layer={config.vision_feature_layer} is not supported "
                "by the vLLM plugin: vLLM feeds the last layer to the projector whatever the config says")
    return None


REFUSALS = (lambda model_config, architecture: unsupported(model_config.hf_config),)


class HiPruneInternVLMultiModalProcessor(TiledProcessorMixin, InternS1MultiModalProcessor):
    geometry = families.INTERNVL
    config_refusals = REFUSALS
    tiles_field, tile_tokens_attr, image_end_attr = "image_num_patches", "image_seq_length", "end_image_token"
    prompt_aware = True

    def _shortened(self, full, token: int, kept: int, item) -> list[int]:
        """One run of placeholders for all tiles between <img> and </img>: tiles x kept of them."""
        tiles = int(item["image_num_patches"].data)
        first, last = full.index(token), len(full) - 1 - full[::-1].index(token)
        return full[:first] + [token] * (kept * tiles) + full[last + 1:]


@MULTIMODAL_REGISTRY.register_processor(HiPruneInternVLMultiModalProcessor, info=InternS1ProcessingInfo,
                                        dummy_inputs=InternS1DummyInputsBuilder)
class HiPruneInternVLForConditionalGeneration(TiledModelMixin, InternS1ForConditionalGeneration):
    geometry = families.INTERNVL
    architecture = ARCHITECTURE
    config_refusals = REFUSALS
    prompt_aware = True

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.hiprune_per_tile = self.num_image_token  # vLLM's tokens per tile
        if self.hiprune_unsupported is not None:
            return  # vLLM's own model; a request asking for pruning is refused (processor, else _process_vision_input)
        layers = self.vision_tower.encoder.layer
        self.hiprune_bind(settings, [layer.attention for layer in layers], len(layers),
                          config.vision_config.num_attention_heads, config)
        size, patch = config.vision_config.image_size, config.vision_config.patch_size
        self.hiprune_grid = (size[0] // patch[0], size[1] // patch[1])
        # Every tile has the same tokens: a budget above them is refused now, not per request.
        settings.keep_count(self.hiprune_per_tile, default_ratio=self.geometry.default_ratio)

    # Override of InternS1ForConditionalGeneration._process_vision_input (images and videos); checked: vllm 0.32.0.
    def _process_vision_input(self, image_input):
        keep = self.hiprune_pending_keep(image_input)
        if keep is None:
            return super()._process_vision_input(image_input)
        if self.hiprune_unsupported is not None:
            raise ValueError(self.hiprune_unsupported)
        tiles = [int(n) for n in image_input["num_patches"]]
        if len(keep) != len(tiles):
            raise RuntimeError(f"hiprune: {len(keep)} kept counts for {len(tiles)} images")
        features, (object_scores, deep_scores) = self.hiprune_taps.scored(
            lambda: self.extract_feature(image_input["pixel_values"]))  # (tiles, tokens, C): projected, CLS dropped
        h, w = self.hiprune_grid
        return tuple(self.hiprune_select_tiles(features, merge_scores(object_scores, h, w, 2).unbind(0),
                                               merge_scores(deep_scores, h, w, 2).unbind(0), (h // 2, w // 2),
                                               keep, tiles, self._hiprune_prompts))

