"""Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration): the Qwen-VL pipeline plus
deepstack.

The tower also merges the outputs of a few intermediate blocks (deepstack_visual_indexes) into extra features that
the language model adds to its first layers' hidden states at the visual positions. They are gathered at the same
kept indices as the main merged tokens, so every deepstack layer sees exactly the kept tokens. Video placeholders
come one run per temporal slice. Object block: round(depth / 2); deep block: the last.
"""

from __future__ import annotations

from .. import families
from ._transformers_api import deepstack_output_class
from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    geometry = families.QWEN3_VL

    def extra_features(self, output):
        return list(output.deepstack_features)

    def encoder_outputs(self, encoded, new):
        output_class = deepstack_output_class(self.model)
        return {kind: output_class(pooler_output=tuple(e.features), deepstack_features=[tuple(level) for level in
                                                                                         e.deepstack])
                for kind, e in encoded.items()}
