"""Gemma 3 (Gemma3ForConditionalGeneration): a SigLIP tower, then a 4 x 4 average pool to 256 tokens per image.

Each image (and each pan-and-scan crop, which arrives as its own image) is pruned on its own: the patch scores are
average-pooled exactly like the features (4 x 4, see grid.py) and the selection runs on the 16 x 16 pooled grid.
`budget` counts kept tokens per image, out of mm_tokens_per_image (256).
token_type_ids shrink with the prompt, so every image's kept tokens stay one contiguous run of type 1 and
Gemma 3's bidirectional attention inside each image covers exactly the kept tokens. Positions are recompacted.
Defaults: object layer round(depth * 9 / 24) (the 10th of SigLIP-so400m's 27); deep layer = the last (its output,
after the post-layernorm, feeds the pool and projector); ratio 1/3 (85 of 256).
"""

from __future__ import annotations

from .. import families
from .paligemma import PaliGemmaAdapter


class Gemma3Adapter(PaliGemmaAdapter):
    """PaliGemma's SigLIP tower and projector call, plus the projector's k x k average pool."""

    model_classes = ("Gemma3ForConditionalGeneration",)
    geometry = families.GEMMA3  # the projector's average pool, from the config
