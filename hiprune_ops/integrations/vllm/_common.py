"""What every vLLM binding shares (imports vLLM: loaded by register() only).

A binding is two subclasses of vLLM's own classes, reading the family's geometry (families.py):
- its processor mixes in ProcessorMixin and says how many tokens each image has unpruned (_image_token_counts)
  and, if it prunes videos, each video's temporal slices and tokens per slice (_video_slice_counts); the mixin
  writes each item's kept count (a video's: per slice) into the prompt (that many placeholders) and its inputs;
- its model mixes in ModelMixin: `hiprune_start` before vLLM's constructor (the server default, the vLLM features
  the taps cannot run with), `hiprune_bind` after it (layers from the geometry, the capture), and per encoder call
  `hiprune_select` (the one selection step of selection.py).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Mapping, Optional, Sequence

import torch

from ... import ops
from .. import families, prompt
from ..selection import select_items
from ..settings import resolve_layer
from . import _vllm_api
from .scores import TowerTaps
from .settings import (HIPRUNE_KEEP_FIELD, KEEP_FIELDS, PROMPT_BETA_FIELD, PROMPT_EXTRA_FIELD, PROMPT_IDS_FIELD,
                       PROMPT_IDS_KWARG, VIDEO_PROMPT_FIELDS, HiPruneSettings, request_hiprune_keys,
                       strip_request_keys)

PROMPT_FIELDS = (PROMPT_IDS_FIELD, PROMPT_BETA_FIELD, PROMPT_EXTRA_FIELD)
# Per modality, the HiPrune++ fields the processor writes per item: text ids, prompt_beta, extra tokens (per slice).
PROMPT_FIELDS_OF = {"image": PROMPT_FIELDS, "video": VIDEO_PROMPT_FIELDS}


def logger():
    from vllm.logger import init_logger
    return init_logger("hiprune_ops.integrations.vllm")


def prepare_vllm_config(vllm_config, model_name: str, video_pruned: bool = False, prompt_aware: bool = False,
                        unsupported: Optional[str] = None) -> HiPruneSettings:
    """The server default, checked, and the vLLM features that cannot run with the q/k taps turned off.

    unsupported: why the plugin cannot prune with this engine (first_reason of the binding's refusals), or None.
    Then a server default stops the engine here, with that reason; without one the engine is vLLM's own, its
    options untouched. Called before the parent constructor builds the tower, so a compiled encoder is never built.
    """
    settings = HiPruneSettings.from_hf_config(vllm_config.model_config.hf_config)
    if settings.video_given and not video_pruned:
        raise ValueError(f"hiprune: video_budget / video_ratio: the vLLM plugin prunes no video of {model_name}")
    if settings.prompt_beta > 0 and not prompt_aware:
        raise ValueError(f"hiprune: prompt_beta: the vLLM plugin adds no HiPrune++ prompt tokens for {model_name} "
                         f"(covered: {', '.join(prompt_aware_architectures())}); leave it out or set it to 0")
    if refuse_at_start(settings, unsupported):
        return settings
    compilation = vllm_config.compilation_config
    # Checked: vllm 0.32.0, CompilationConfig.compile_mm_encoder.
    if getattr(compilation, "compile_mm_encoder", False):
        compilation.compile_mm_encoder = False
        logger().warning("hiprune: compile_mm_encoder turned off for %s (the q/k taps run eagerly)", model_name)
    return settings


def refuse_at_start(settings: HiPruneSettings, unsupported: Optional[str]) -> bool:
    """The one start rule for what the plugin cannot prune: with a server default, the engine does not start (the
    reason raised); without one, True: the model runs as vLLM's own, and a request asking for pruning is refused."""
    if unsupported is None:
        return False
    if settings.enabled:
        raise NotImplementedError(unsupported)
    logger().info("%s; the model runs as vLLM's own, a request giving a hiprune_* value is refused", unsupported)
    return True


# -- why the plugin cannot prune: each check returns the reason or None ---------------------------------------------
# Config refusals read vLLM's ModelConfig (the checkpoint's hf_config, the multimodal options): the processor runs
# them too and refuses a request's hiprune_* values with the reason. Engine refusals read the whole VllmConfig,
# which the processor never sees: the model alone knows them (a pruned request then fails in the encoder).
def first_reason(checks: Sequence, config, architecture: str) -> Optional[str]:
    return next((reason for check in checks if (reason := check(config, architecture)) is not None), None)


def evs_refusal(model_config, architecture: str) -> Optional[str]:
    # Checked: vllm 0.32.0, MultiModalConfig.is_multimodal_pruning_enabled (video_pruning_rate, EVS).
    multimodal = getattr(model_config, "multimodal_config", None)
    if multimodal is not None and multimodal.is_multimodal_pruning_enabled():
        return (f"hiprune: {architecture} with vLLM's own video pruning (video_pruning_rate, EVS) is not supported: "
                "the HiPrune plugin prunes videos itself; use one or the other")
    return None


FLASHINFER_REASON = ("hiprune: {} with the FlashInfer ViT attention backend is not supported (it rewrites the "
                     "images' cu_seqlens)")


def flashinfer_refusal(model_config, architecture: str) -> Optional[str]:
    """The FlashInfer ViT backend asked for (mm_encoder_attn_backend); the one vLLM picks is checked at bind."""
    # Checked: vllm 0.32.0, MultiModalConfig.mm_encoder_attn_backend (None, or an AttentionBackendEnum).
    backend = getattr(getattr(model_config, "multimodal_config", None), "mm_encoder_attn_backend", None)
    return FLASHINFER_REASON.format(architecture) if "FLASHINFER" in str(backend).upper() else None


def cuda_graph_refusal(vllm_config, architecture: str) -> Optional[str]:
    # Checked: vllm 0.32.0, CompilationConfig.cudagraph_mm_encoder.
    if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
        return (f"hiprune: {architecture} with cudagraph_mm_encoder=True is not supported (a replayed encoder graph "
                "skips the q/k taps); turn the encoder CUDA graph off")
    return None


def pipeline_refusal(vllm_config, architecture: str) -> Optional[str]:
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return (f"hiprune: {architecture} with pipeline parallelism is not supported (later stages would not get "
                "the kept tokens' M-RoPE positions)")
    return None


class RefusedTaps:
    """In place of TowerTaps on a model the plugin cannot prune: no hook anywhere; pruning asked for fails with the
    reason (a request the processor could not refuse: an engine refusal)."""

    def __init__(self, reason: str):
        self.reason = reason

    def scored(self, run):
        raise ValueError(self.reason)


def keep_counts(kwargs: dict, field: str = HIPRUNE_KEEP_FIELD) -> Optional[list[int]]:
    """Pops the per-item kept counts the processor wrote in `field` (KEEP_FIELDS[modality]; a video's: per slice);
    None for inputs that did not go through it."""
    keep = kwargs.pop(field, None)
    if keep is None:
        return None
    if isinstance(keep, (list, tuple)):
        keep = torch.stack([torch.as_tensor(k) for k in keep])
    return [int(k) for k in keep.reshape(-1).tolist()]


@functools.lru_cache(maxsize=None)
def prompt_aware_architectures() -> tuple[str, ...]:
    """The architectures whose bound model classes (vllm/__init__.py's _MODELS) add HiPrune++ prompt tokens (their
    `prompt_aware`): read from the classes, so a binding that turns its flag on is listed with no list to edit."""
    from . import _MODELS

    covered = []
    for architecture, target in _MODELS.items():
        module, _, name = target.partition(":")
        if getattr(getattr(importlib.import_module(module), name), "prompt_aware", False):
            covered.append(architecture)
    return tuple(covered)


def item_kept_count(item, modality: str = "image") -> Optional[int]:
    """The tokens the processor wrote for one processed item (a video's: per slice): its kept count plus its
    HiPrune++ extra tokens; None (embeddings given directly)."""
    field = item.get(KEEP_FIELDS[modality]) if hasattr(item, "get") else None
    if field is None:
        return None
    extra = item.get(PROMPT_FIELDS_OF[modality][2])
    return int(field.data) + (0 if extra is None else int(extra.data))


def kept_count_of(out_mm_kwargs, item_idx: int, modality: str = "image") -> Optional[int]:
    """item_kept_count of item item_idx of a processor output."""
    return item_kept_count(out_mm_kwargs[modality][item_idx], modality)


def prompt_inputs(kwargs: dict, modality: str = "image") -> Optional[tuple[list[torch.Tensor], list[float], list[int]]]:
    """Pops the HiPrune++ fields the processor wrote per item of a modality: (text ids, prompt_beta, extra tokens
    (a video's: per slice)) per item; None when no item gets extra tokens (prompt_beta 0, no text) or the binding
    writes none."""
    ids, betas, extras = (kwargs.pop(name, None) for name in PROMPT_FIELDS_OF[modality])
    if ids is None:
        return None
    extras = [int(e) for e in torch.as_tensor(extras).reshape(-1).tolist()]
    if not any(extras):
        return None
    ids = list(ids) if isinstance(ids, (list, tuple)) else list(ids.unbind(0))
    return ([i.reshape(-1) for i in ids], [float(b) for b in torch.as_tensor(betas).reshape(-1).tolist()], extras)


def tile_prompts(prompts: Optional[tuple[list[torch.Tensor], list[float], list[int]]], tiles: Sequence[int],
                 split: bool = False) -> Optional[tuple[list[torch.Tensor], list[float], list[int]]]:
    """prompt_inputs per image -> per tile (per video -> per frame, `tiles` its frames): every tile of an image has
    its text ids and prompt_beta; its extra tokens are the image's (written per tile), or with `split` the image's
    total over its tiles (AnyRes)."""
    if prompts is None:
        return None
    ids, betas, extras = prompts

    def each(values):
        return [value for value, count in zip(values, tiles) for _ in range(count)]

    return each(ids), each(betas), each([e // count if split else e for e, count in zip(extras, tiles)])


def expand_placeholder(ids, target: int, expansion: Sequence[int]) -> list[int]:
    """ids with every `target` (the image placeholder vLLM replaces) replaced by `expansion`: HiPrune++'s text rule
    then reads the prompt as apply_hiprune does, after the image's tokens and the markers that close them."""
    return [t for token in ids for t in (expansion if token == target else [token])]


def shrink_runs(ids, token: int, kept: int) -> list[int]:
    """ids with every run of `token` cut to its first `kept` (one run per tile; the markers between runs stay)."""
    out, run = [], 0
    for t in ids:
        run = run + 1 if t == token else 0
        if run <= kept:
            out.append(t)
    return out


def shrunk_image_updates(updates, out_mm_kwargs, token: int) -> list:
    """vLLM's prompt updates with each image's runs of `token` cut to its kept count (kept_count_of); the markers
    around them stay. An update's content may be a function of the item or fixed (PaliGemma's insertion)."""
    from vllm.multimodal.processing import PromptInsertion, PromptUpdateDetails

    updates = list(updates)
    for i, update in enumerate(updates):
        if update.modality != "image":
            continue

        def content(item_idx: int, original=update.content):
            details = original(item_idx) if callable(original) else original
            kept = kept_count_of(out_mm_kwargs, item_idx)
            if kept is None:
                return details
            full = details.full if isinstance(details, PromptUpdateDetails) else details
            return PromptUpdateDetails.select_token_id(shrink_runs(full, token, kept), token)

        name = "insertion" if isinstance(update, PromptInsertion) else "replacement"
        updates[i] = dataclasses.replace(update, **{name: content})
    return updates


class ProcessorMixin:
    """Writes each image's kept count into its inputs, where the prompt update and the encoder both read it.

    Subclasses set `geometry` and define _image_token_counts(processed) -> full token count per image; those that
    prune videos set video_pruned and define _video_slice_counts, _video_item_slices and, if their video placeholder
    is not the config's video_token_id, _video_embed_token.
    """

    geometry: families.Geometry
    video_pruned = False
    prompt_aware = False  # the binding adds HiPrune++ prompt tokens to images (prompt_aware_architectures)
    video_prompt_aware = False  # and to each slice of a video (else prompt_beta with a video is refused)

    _hiprune_profiling = False  # set while vLLM processes its dummy inputs
    config_refusals: tuple = ()  # the binding's config refusals (the model's too): a request's hiprune_* is refused

    def _hiprune_unsupported(self) -> Optional[str]:
        """Why the plugin cannot prune with this model config, or None (ModelMixin.hiprune_start: the same checks)."""
        model_config = self.info.ctx.model_config
        return first_reason(self.config_refusals, model_config, model_config.architecture)

    def _hiprune_settings(self, mm_kwargs: Mapping[str, object]) -> HiPruneSettings:
        if self._hiprune_profiling:
            return HiPruneSettings()  # off: every image keeps all its tokens
        unsupported = self._hiprune_unsupported()
        if unsupported is not None:  # vLLM's own model (a server default would have stopped the engine)
            given = request_hiprune_keys(mm_kwargs)
            if given:
                raise ValueError(f"mm_processor_kwargs: {', '.join(given)}: {unsupported}")
            return HiPruneSettings()
        settings = HiPruneSettings.from_hf_config(self.info.get_hf_config()).for_request(mm_kwargs)
        if settings.video_given and not self.video_pruned:
            raise ValueError("mm_processor_kwargs: hiprune_video_budget / hiprune_video_ratio: the vLLM plugin prunes "
                             "no video of this model")
        if settings.prompt_beta > 0 and not self.prompt_aware:
            raise ValueError("mm_processor_kwargs: hiprune_prompt_beta: the vLLM plugin adds no HiPrune++ prompt "
                             f"tokens for this model (covered: {', '.join(prompt_aware_architectures())})")
        return settings

    @functools.cached_property
    def _prompt_token_ids(self) -> tuple[list[int], set[int], set[int]]:
        """(visual placeholder, special, end-of-turn) ids of prompt.py's rule, from apply_hiprune's configs
        (hf/base.py): the model's, its text config's and its generation config's (whose eos may be the only
        end-of-turn id), with the tokenizer's special ids. Read once: the generation config comes from disk."""
        config = self.info.get_hf_config()
        configs = (config, getattr(config, "text_config", None), _vllm_api.generation_config(self.info))
        visual_ids = prompt.config_token_ids(config, names=("image_token_id", "image_token_index", "video_token_id",
                                                            "video_token_index"))
        special_ids = prompt.config_token_ids(*configs) | set(self.info.get_tokenizer().all_special_ids)
        return sorted(visual_ids), special_ids, prompt.config_token_ids(*configs, names=("eos_token_id",))

    def _prompt_text_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt's text token ids by prompt.py's rule (as apply_hiprune): after the last image or video
        placeholder, up to the next special or end-of-turn token."""
        visual_ids, special_ids, end_ids = self._prompt_token_ids
        ids = torch.tensor([list(prompt_ids)], dtype=torch.int64)
        visual = torch.isin(ids, torch.tensor(visual_ids, dtype=torch.int64))
        return ids[prompt.text_mask(ids, visual, special_ids, end_ids=end_ids)].tolist()

    # Override of BaseMultiModalProcessor.apply (inputs.prompt: the prompt's token ids); checked: vllm 0.32.0.
    # HiPrune++: the request's prompt text ids join the processor kwargs, which vLLM hashes with each item, so the
    # same image under another prompt never shares a processor, encoder or prefix cache entry.
    def apply(self, inputs, *args, **kwargs):
        modalities = ("image", "video") if self.video_prompt_aware else ("image",)
        if self.prompt_aware and not self._hiprune_profiling and any(m in inputs.mm_data_items for m in modalities):
            if self._hiprune_settings(inputs.hf_processor_mm_kwargs).prompt_beta > 0:
                mm_kwargs = {**inputs.hf_processor_mm_kwargs, PROMPT_IDS_KWARG: self._prompt_text_ids(inputs.prompt)}
                inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=mm_kwargs)
        return super().apply(inputs, *args, **kwargs)

    def _video_slice_counts(self, processed) -> list[tuple[int, int]]:
        """Per video: (temporal slices, merged tokens per slice) unpruned; [] without videos."""
        return []

    def _video_item_slices(self, item) -> int:
        """Temporal slices of one processed video item (out_mm_kwargs["video"][i])."""
        raise NotImplementedError

    def _video_embed_token(self) -> int:
        """The placeholder id a video's embeddings take in the prompt."""
        return self.info.get_hf_config().video_token_id

    # Override of BaseMultiModalProcessor.get_dummy_mm_inputs; checked: vllm 0.32.0. vLLM sizes the encoder cache
    # and profiles memory from these inputs: they keep every token, since a request may ask for all of them
    # (pruned by the server default, a larger per-request budget would not fit the cache). No processor cache:
    # an unpruned entry must not answer a real request for the same image.
    def get_dummy_mm_inputs(self, mm_counts, *, cache=None, **kwargs):
        self._hiprune_profiling = True
        try:
            return super().get_dummy_mm_inputs(mm_counts, cache=None, **kwargs)
        finally:
            self._hiprune_profiling = False

    # Override of BaseMultiModalProcessor._apply_hf_processor_main (every processor's path to the Hugging Face
    # processor; Qwen3-VL's does not go through _call_hf_processor); checked: vllm 0.32.0.
    def _apply_hf_processor_main(self, mm_items, hf_kwargs, *args, **kwargs):
        settings = self._hiprune_settings(hf_kwargs)  # a bad request value fails here, for this request only
        processed = super()._apply_hf_processor_main(mm_items, strip_request_keys(hf_kwargs), *args, **kwargs)
        counts = self._image_token_counts(processed)
        if counts:
            kept = self._kept_counts(settings, counts, processed)
            processed[HIPRUNE_KEEP_FIELD] = torch.tensor(kept, dtype=torch.int64)
            if self.prompt_aware:
                processed.update(self._prompt_fields("image", hf_kwargs, settings, kept, counts, processed))
        videos = self._video_slice_counts(processed) if self.video_pruned else []
        if videos:
            per_slice = [settings.keep_count(n, clamp=self.geometry.sizes_vary,
                                             default_ratio=self.geometry.default_ratio, kind="video")
                         for _, n in videos]
            processed[KEEP_FIELDS["video"]] = torch.tensor(per_slice, dtype=torch.int64)
            if self.video_prompt_aware:
                processed.update(self._prompt_fields("video", hf_kwargs, settings, per_slice, [n for _, n in videos]))
            elif settings.prompt_beta > 0:
                raise ValueError("hiprune_prompt_beta: the vLLM plugin adds no HiPrune++ prompt tokens to the videos "
                                 "of this model (its images only); send the video without prompt_beta")
        return processed

    def _prompt_fields(self, modality: str, hf_kwargs, settings: HiPruneSettings, kept: list[int],
                       counts: list[int], processed=None) -> dict:
        """HiPrune++ fields of a modality's items (PROMPT_FIELDS_OF), kept / counts per item (a video's: per slice).
        Every item carries them (beta 0: no extra tokens), so any two items batch together."""
        text_ids = list(hf_kwargs.get(PROMPT_IDS_KWARG) or [])
        beta = float(settings.prompt_beta)
        # A family's _extra_counts override counts its images (AnyRes tiles); a video slice is one grid: the default.
        extra_counts = type(self)._extra_counts if modality == "image" else ProcessorMixin._extra_counts
        extras = extra_counts(self, beta, bool(text_ids), kept, counts, processed)
        ids_field, beta_field, extra_field = PROMPT_FIELDS_OF[modality]
        return {ids_field: torch.tensor([text_ids] * len(kept), dtype=torch.int64),
                beta_field: torch.tensor([beta] * len(kept), dtype=torch.float64),
                extra_field: torch.tensor(extras, dtype=torch.int64)}

    def _kept_counts(self, settings: HiPruneSettings, counts: list[int], processed) -> list[int]:
        """Kept tokens per image out of its `counts`; a family whose budget splits over tiles overrides it."""
        return [settings.keep_count(n, clamp=self.geometry.sizes_vary, default_ratio=self.geometry.default_ratio)
                for n in counts]

    def _extra_counts(self, beta: float, has_text: bool, kept: list[int], counts: list[int], processed) -> list[int]:
        """HiPrune++ tokens per image on top of its kept count, in the same unit (per tile for tiled families);
        a family that counts an image whole but selects it tile by tile (AnyRes) overrides it."""
        return [ops.prompt_extra_count(k, n, beta, has_text=has_text) for k, n in zip(kept, counts)]

    # Override of BaseMultiModalProcessor._get_mm_fields_config; checked: vllm 0.32.0.
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        for modality in ("image", "video") if self.video_pruned else ("image",):
            fields[KEEP_FIELDS[modality]] = MultiModalFieldConfig.batched(modality)
        for modality, aware in (("image", self.prompt_aware), ("video", self.video_prompt_aware)):
            if aware:
                fields.update({name: MultiModalFieldConfig.batched(modality) for name in PROMPT_FIELDS_OF[modality]})
        return fields

    # Override of BaseMultiModalProcessor._get_prompt_updates; checked: vllm 0.32.0. Every image update's
    # replacement becomes its kept count of the target's placeholder token; every video update's keeps its markers
    # (timestamps, frame starts and ends) and cuts its runs of the video placeholder to their kept share.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        for i, update in enumerate(updates):
            if update.modality == "video" and self.video_pruned:
                replacement = self._video_replacement(update.replacement, out_mm_kwargs)
            elif update.modality == "image":
                def replacement(item_idx: int, original=update.replacement, token=update.target[0]):
                    kept = kept_count_of(out_mm_kwargs, item_idx)
                    return original(item_idx) if kept is None else [token] * kept
            else:
                continue
            updates[i] = PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)
        return updates

    def _video_replacement(self, original, out_mm_kwargs):
        """A video's prompt update (vLLM's: one run of placeholders per video, or per slice between markers) with
        each slice's kept count of placeholders: a run holding s slices keeps s times the per-slice count."""
        from vllm.multimodal.processing import PromptUpdateDetails

        token = self._video_embed_token()

        def replacement(item_idx: int):
            details = original(item_idx)
            kept = kept_count_of(out_mm_kwargs, item_idx, "video")
            if kept is None:
                return details
            full = details.full if isinstance(details, PromptUpdateDetails) else list(details)
            slices = self._video_item_slices(out_mm_kwargs["video"][item_idx])
            runs = sum(1 for j, t in enumerate(full) if t == token and (j == 0 or full[j - 1] != token))
            if runs == 0 or slices % runs:
                raise RuntimeError(f"hiprune: a video of {slices} slices has {runs} runs of placeholders")
            return PromptUpdateDetails.select_token_id(shrink_runs(full, token, kept * (slices // runs)), token)

        return replacement


class TiledProcessorMixin(ProcessorMixin):
    """Families whose images are tiles of one size between marker tokens (InternVL, Idefics3): the kept count
    written is per tile (HiPrune++: the extra count too). Subclasses set tiles_field (the processor output counting
    an image's tiles), tile_tokens_attr (the Hugging Face processor's tokens per tile) and image_end_attr (its
    marker closing an image's expansion), and define _shortened(full, token, kept, item) -> the image's prompt ids
    with `kept` placeholders per tile (item: its processed inputs)."""

    tiles_field: str
    tile_tokens_attr: str
    image_end_attr: str

    def _prompt_text_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        # vLLM expands each image placeholder to its tiles' runs, the last closed by the end marker: the text
        # follows that marker (a plain word in some tokenizers), as in the prompt apply_hiprune reads.
        processor = self.info.get_hf_processor()
        end = self.info.get_tokenizer().encode(getattr(processor, self.image_end_attr), add_special_tokens=False)
        token = processor.image_token_id
        return super()._prompt_text_ids(expand_placeholder(prompt_ids, token, [token, *end]))

    def _image_token_counts(self, processed) -> list[int]:
        num_patches = processed.get(self.tiles_field)
        if num_patches is None:
            return []
        return [getattr(self.info.get_hf_processor(), self.tile_tokens_attr)] * len(num_patches)

    # Override of BaseMultiModalProcessor._get_prompt_updates (the family's vLLM one, not ProcessorMixin's, whose
    # plain run of placeholders would drop the tile markers); checked: vllm 0.32.0.
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

        updates = list(super(ProcessorMixin, self)._get_prompt_updates(mm_items, hf_processor_mm_kwargs,
                                                                         out_mm_kwargs))
        per_tile = getattr(self.info.get_hf_processor(**hf_processor_mm_kwargs), self.tile_tokens_attr)
        for i, update in enumerate(updates):
            if update.modality != "image":
                continue
            original, token = update.replacement, update.target[0]

            def replacement(item_idx: int, original=original, token=token):
                details = original(item_idx)
                kept = kept_count_of(out_mm_kwargs, item_idx)
                if kept is None or kept >= per_tile:
                    return details
                ids = self._shortened(details.full, token, kept, out_mm_kwargs["image"][item_idx])
                return PromptUpdateDetails.select_token_id(ids, token)

            updates[i] = PromptReplacement(modality="image", target=update.target, replacement=replacement)
        return updates


class ModelMixin:
    """The model side of a binding: settings, layers, capture and selection, from the family's geometry."""

    geometry: families.Geometry
    architecture: str  # vLLM's name of the class this binding subclasses

    video_pruned = False  # the binding prunes videos (video_budget / video_ratio are refused otherwise)
    prompt_aware = False  # the binding adds HiPrune++ prompt tokens to images (prompt_beta is refused otherwise)
    config_refusals: tuple = ()  # checks of vLLM's ModelConfig, the binding's processor runs them too
    engine_refusals: tuple = (cuda_graph_refusal,)  # checks of the VllmConfig (the model alone sees it)
    packed_tower = False  # images packed with cu_seqlens, which vLLM's FlashInfer ViT backend rewrites
    hiprune_unsupported: Optional[str] = None  # why the plugin cannot prune here: the model is vLLM's own

    def hiprune_start(self, vllm_config) -> HiPruneSettings:
        """Before vLLM's constructor: the server default, checked, and why the plugin cannot prune with this
        engine (hiprune_unsupported): with a server default the engine does not start, without one it is vLLM's."""
        self.hiprune_unsupported = (first_reason(self.config_refusals, vllm_config.model_config, self.architecture)
                                    or first_reason(self.engine_refusals, vllm_config, self.architecture))
        return prepare_vllm_config(vllm_config, self.architecture, self.video_pruned, self.prompt_aware,
                                   self.hiprune_unsupported)

    def hiprune_bind(self, settings: HiPruneSettings, attention_modules: Sequence[torch.nn.Module], depth: int,
                     total_heads: int, geometry_config, full_depth: Optional[int] = None) -> None:
        """After vLLM's constructor. attention_modules: the tower's attention modules, first layer first (those vLLM
        built: depth of them), each holding its MMEncoderAttention as `.attn` (tapped; with fewer heads than
        total_heads, the heads are split over tensor-parallel ranks and the scores summed over them); full_depth:
        the checkpoint's depth when vLLM builds fewer layers (LLaVA stops at the layer feeding the projector), for
        the default layers. A model the plugin cannot prune (hiprune_unsupported; the FlashInfer ViT backend vLLM
        picked for a packed tower, found here) gets no taps."""
        modules = [attention_modules[i - 1] for i in self.hiprune_layers(settings, depth, geometry_config, full_depth)]
        if (self.hiprune_unsupported is None and self.packed_tower
                and "FLASHINFER" in _vllm_api.attention_backend_name(modules[0].attn)):
            self.hiprune_unsupported = FLASHINFER_REASON.format(self.architecture)
            refuse_at_start(settings, self.hiprune_unsupported)
        if self.hiprune_unsupported is not None:
            self.hiprune_taps = RefusedTaps(self.hiprune_unsupported)
            return
        self.hiprune_taps = TowerTaps([module.attn for module in modules], total_heads,
                                      _vllm_api.tp_all_reduce(modules[0].attn, total_heads),
                                      num_prefix=self.geometry.num_prefix)

    def hiprune_layers(self, settings: HiPruneSettings, depth: int, geometry_config,
                       full_depth: Optional[int] = None) -> tuple[int, int]:
        """The settings, and the 1-based object and deep layers (the geometry's defaults, or the settings'), kept
        on the model; the binding captures those layers (hiprune_bind: vLLM's encoder attention)."""
        self.hiprune_settings = settings
        full_depth = full_depth or depth
        defaults = [min(depth, rule(full_depth, geometry_config))
                    for rule in (self.geometry.object_layer, self.geometry.deep_layer)]
        self.hiprune_object_layer = resolve_layer(settings.object_layer, depth, defaults[0], "object_layer")
        self.hiprune_deep_layer = resolve_layer(settings.deep_layer, depth, defaults[1], "deep_layer")
        self.hiprune_last: list = []  # per image of the latest pruned encoder call: kept indices, None if all kept
        return self.hiprune_object_layer, self.hiprune_deep_layer

    def hiprune_select(self, object_scores: Sequence[torch.Tensor], deep_scores: Sequence[torch.Tensor],
                       grids: Sequence[tuple[int, int]], keeps: Sequence[int], merge: int = 1,
                       features: Optional[Sequence[torch.Tensor]] = None,
                       prompts: Optional[tuple[list[torch.Tensor], list[float], list[int]]] = None,
                       ) -> list[Optional[torch.Tensor]]:
        """Kept indices per image (None: it keeps every token), recorded in hiprune_last. merge: the scores are on
        patch grids, pooled merge x merge by the selection step (select_items). HiPrune++: features, per image
        every token as the language model receives them, and prompts (prompt_inputs: per image its text ids,
        prompt_beta and extra count) add each image's prompt tokens."""
        if len(keeps) != len(grids):
            raise RuntimeError(f"hiprune: {len(keeps)} kept counts for {len(grids)} images")
        if prompts is None:
            indices, _ = select_items(object_scores, deep_scores, grids, keeps, self.hiprune_settings, merge=merge,
                                      skip_full=True)
            self.hiprune_last = list(indices)
            return self.hiprune_last
        text_ids, betas, extras = prompts
        embeddings = self.hiprune_prompt_embeddings(text_ids)
        indices = [None] * len(grids)
        for beta in sorted(set(betas)):  # a batch may hold requests with their own prompt_beta
            members = [i for i, b in enumerate(betas) if b == beta]
            settings = dataclasses.replace(self.hiprune_settings, prompt_beta=beta)
            chosen, _ = select_items(*([seq[i] for i in members] for seq in (object_scores, deep_scores, grids, keeps)),
                                     settings, merge=merge, skip_full=True,
                                     features=[features[i] for i in members],
                                     prompts=[embeddings[i] for i in members])
            for i, index in zip(members, chosen):
                indices[i] = index
        for i, index in enumerate(indices):  # the processor wrote keep + extra placeholders
            if (keeps[i] + extras[i]) != (index.numel() if index is not None else keeps[i]):
                raise RuntimeError(f"hiprune: item {i} got {0 if index is None else index.numel()} tokens, its "
                                   f"prompt holds {keeps[i] + extras[i]}")
        self.hiprune_last = list(indices)
        return self.hiprune_last

    def hiprune_prompt_embeddings(self, text_ids: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """HiPrune++: per image, the float32 mean of the language model's input embeddings over its prompt's text
        ids, or None (no text: no extra tokens). Images of one request share their prompt: embedded once."""
        embedded: dict[tuple, Optional[torch.Tensor]] = {}
        out = []
        for ids in text_ids:
            key = tuple(ids.tolist())
            if key not in embedded:
                embedded[key] = None
                if key:
                    language = self.get_language_model()
                    device = next(language.parameters()).device
                    rows = language.embed_input_ids(ids.to(device=device, dtype=torch.int64))
                    embedded[key] = prompt.mean_embeddings(rows[None], torch.ones(1, len(key), dtype=torch.bool,
                                                                                  device=device))[0]
            out.append(embedded[key])
        return out

    def hiprune_select_tiles(self, features, object_scores, deep_scores, grid: tuple[int, int],
                             keep: Sequence[int], tiles: Sequence[int],
                             prompts: Optional[tuple[list[torch.Tensor], list[float], list[int]]] = None,
                             ) -> list[torch.Tensor]:
        """Families whose images are tiles of one grid (InternVL, Idefics3, Gemma 3, PaliGemma): every tile selected
        on its own grid, keeping its image's per-tile count; per image, its tiles' kept features, tile after tile.
        features: (tiles, tokens, D) as the language model receives them; object_scores / deep_scores: per tile,
        merged like the features; prompts (prompt_inputs, per image, extra tokens per tile): HiPrune++, every tile
        of an image getting its extra tokens for the image's prompt, as apply_hiprune's tiles do."""
        tile_keep = [k for k, count in zip(keep, tiles) for _ in range(count)]
        indices = self.hiprune_select(object_scores, deep_scores, [grid] * len(features), tile_keep,
                                      features=None if prompts is None else list(features),
                                      prompts=tile_prompts(prompts, tiles))
        kept = [tile if index is None else tile[index] for tile, index in zip(features, indices)]
        starts = [sum(tiles[:i]) for i in range(len(tiles))]
        return [torch.cat(kept[start:start + count]) for start, count in zip(starts, tiles)]


class StashedKeepModelMixin(ModelMixin):
    """Families whose processor writes a kept count per image that vLLM's tower call, made inside embed_multimodal,
    needs (InternVL, Idefics3, Gemma 4, LLaVA-OneVision): embed_multimodal stashes the counts for it, in
    _hiprune_keep (and a video's per frame in _hiprune_video_keep), and the HiPrune++ fields (prompt_inputs) of the
    images in _hiprune_prompts, of the videos in _hiprune_video_prompts."""

    _hiprune_keep: Optional[list[int]] = None
    _hiprune_video_keep: Optional[list[int]] = None  # per video: tokens kept per frame (families pruning videos)
    _hiprune_prompts = None  # HiPrune++ fields of the call's images (prompt_inputs), for prompt_aware bindings
    _hiprune_video_prompts = None  # and of its videos (extra tokens per frame), for video_prompt_aware ones

    def hiprune_take_keep(self, kwargs: dict) -> Optional[list[int]]:
        """Pops the counts the processor wrote, as the tower call needs them."""
        return keep_counts(kwargs)

    def embed_multimodal(self, **kwargs):
        self._hiprune_keep = self.hiprune_take_keep(kwargs)
        self._hiprune_video_keep = keep_counts(kwargs, KEEP_FIELDS["video"])
        self._hiprune_prompts = prompt_inputs(kwargs)
        self._hiprune_video_prompts = prompt_inputs(kwargs, "video")
        try:
            return super().embed_multimodal(**kwargs)
        finally:
            self._hiprune_keep = self._hiprune_video_keep = self._hiprune_prompts = self._hiprune_video_prompts = None


class TiledModelMixin(StashedKeepModelMixin):
    """Tiled families (InternVL, Idefics3): the stashed counts are per tile. Subclasses set hiprune_per_tile."""

    hiprune_per_tile: int

    def hiprune_pending_keep(self, image_input) -> Optional[list[int]]:
        """The stashed kept counts when this input has a tile to prune, else None (vLLM's own path runs)."""
        keep = self._hiprune_keep
        if keep is None or image_input["type"] != "pixel_values" or all(k >= self.hiprune_per_tile for k in keep):
            return None
        return keep


def clip_tower_unsupported(config, family: str):
    """Why the plugin cannot prune this LLaVA-style checkpoint (it needs a CLIP tower, the "default" select
    strategy and one feature layer), or None."""
    if config.vision_config.model_type != "clip_vision_model":
        return (f"hiprune: {family} with a {config.vision_config.model_type} tower is not supported by the vLLM "
                "plugin (CLIP only)")
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        return (f"hiprune: {family} is supported with vision_feature_select_strategy='default' and one "
                "vision_feature_layer")
    return None


def clip_tower_refusal(family: str):
    """The config refusal of a LLaVA-style family with a CLIP tower (clip_tower_unsupported)."""
    return lambda model_config, architecture: clip_tower_unsupported(model_config.hf_config, family)


class ClipLlavaModelMixin(ModelMixin):
    """LLaVA-style models whose CLIP (LLaVA-OneVision: SigLIP) tower vLLM builds up to the layer feeding the
    projector (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): a checkpoint the plugin cannot prune (config_refusals) runs
    as vLLM's own, refused only with a setting."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        settings = self.hiprune_start(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        self.hiprune_grid = config.vision_config.image_size // config.vision_config.patch_size
        if self.hiprune_unsupported is not None:
            return  # vLLM's own model; a request asking for pruning is refused (processor, else embed_multimodal)
        layers = self.vision_tower.vision_model.encoder.layers
        self.hiprune_bind(settings, [layer.self_attn for layer in layers], len(layers),
                          config.vision_config.num_attention_heads, config,
                          full_depth=config.vision_config.num_hidden_layers)
