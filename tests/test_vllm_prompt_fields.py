"""Tier 1: the vLLM plugin's HiPrune++ plumbing without vLLM: the prompt text the processor takes (the generation
config's eos ends it, as in apply_hiprune), and the per-video fields (extra tokens per slice) from the processor to
the encoder and the prompt's placeholder count."""

from types import SimpleNamespace

import pytest
import torch

from hiprune_ops import ops
from hiprune_ops.integrations.vllm import _common
from hiprune_ops.integrations.vllm.settings import KEEP_FIELDS, PROMPT_IDS_KWARG, HiPruneSettings

IMAGE, START, END, PAD, EOS, EOT = 151, 150, 153, 0, 2, 7  # EOT: an eos only the generation config names


class Info:
    """The processing info a processor reads: the model config, the tokenizer, the generation config."""

    def __init__(self, generation: dict):
        self.config = SimpleNamespace(image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
                                      eos_token_id=EOS, pad_token_id=PAD)
        self.ctx = SimpleNamespace(model_config=SimpleNamespace(try_get_generation_config=lambda: dict(generation)))

    def get_hf_config(self):
        return self.config

    def get_tokenizer(self):
        return SimpleNamespace(all_special_ids=[PAD, 1, EOS, 3])


def processor(generation: dict):
    made = _common.ProcessorMixin()
    made.info = Info(generation)
    return made


def test_the_generation_configs_eos_ends_the_prompt_text():
    prompt = [1, 20, START, IMAGE, END, 30, 31, EOT, 32, EOS]
    assert processor({})._prompt_text_ids(prompt) == [30, 31, EOT, 32]
    assert processor({"eos_token_id": [EOS, EOT]})._prompt_text_ids(prompt) == [30, 31]
    # Right after the image: an end-of-turn token leaves no text (a special one is skipped).
    assert processor({"eos_token_id": EOT})._prompt_text_ids([START, IMAGE, END, EOT, 30, 31]) == []
    assert processor({})._prompt_text_ids([START, IMAGE, END, EOT, 30, 31]) == [EOT, 30, 31]
    assert processor({"bos_token_id": 30})._prompt_text_ids(prompt) == [31, EOT, 32]  # its token ids are special


class Field:
    def __init__(self, data):
        self.data = torch.as_tensor(data)


def item_of(fields: dict, index: int) -> dict:
    """One item of batched processor fields, as vLLM hands it to the prompt update."""
    return {name: Field(values[index]) for name, values in fields.items()}


@pytest.mark.parametrize("text", [[30, 31], []])
def test_video_fields_carry_extra_tokens_per_slice(text):
    settings = HiPruneSettings(enabled=True, ratio=0.25, prompt_beta=0.5)
    per_slice, counts = [6, 2], [24, 8]  # two videos: tokens kept per slice of their merged tokens per slice
    fields = _common.ProcessorMixin()._prompt_fields("video", {PROMPT_IDS_KWARG: text}, settings, per_slice, counts)
    fields[KEEP_FIELDS["video"]] = torch.tensor(per_slice)
    extras = [ops.prompt_extra_count(k, n, 0.5, has_text=bool(text)) for k, n in zip(per_slice, counts)]
    assert extras == ([3, 1] if text else [0, 0])
    for i in range(2):  # the prompt's placeholders per slice: kept + extra
        assert _common.item_kept_count(item_of(fields, i), "video") == per_slice[i] + extras[i]
        assert _common.item_kept_count(item_of(fields, i), "image") is None  # the image fields are others
    popped = _common.prompt_inputs(dict(fields), "video")
    if not text:
        assert popped is None  # no extra tokens anywhere: plain HiPrune
        return
    ids, betas, popped_extras = popped
    assert [i.tolist() for i in ids] == [text, text] and betas == [0.5, 0.5] and popped_extras == extras
    assert _common.prompt_inputs(dict(fields), "image") is None


def test_prompt_fields_of_each_modality_are_distinct():
    image, video = _common.PROMPT_FIELDS_OF["image"], _common.PROMPT_FIELDS_OF["video"]
    assert len(set(image) | set(video)) == 6 and image == _common.PROMPT_FIELDS


def test_a_familys_image_extra_count_leaves_video_slices_to_the_default():
    class AnyRes(_common.ProcessorMixin):  # an override as LLaVA-NeXT's: its images' count is its own
        def _extra_counts(self, beta, has_text, kept, counts, processed):
            return [99] * len(kept)

    settings = HiPruneSettings(enabled=True, ratio=0.25, prompt_beta=0.5)
    fields = {modality: AnyRes()._prompt_fields(modality, {PROMPT_IDS_KWARG: [30]}, settings, [6], [24])
              for modality in ("image", "video")}
    assert [fields[m][_common.PROMPT_FIELDS_OF[m][2]].tolist() for m in ("image", "video")] == [[99], [3]]
