"""Received-attention scores of chosen layers, taken from q and k inside transformers' attention interface.

Every attention module of transformers looks its kernel up by name at call time
(ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)). We wrap that kernel
once, for the name the tower uses, with a function that calls the original kernel unchanged and, only for modules
that carry a `ScoreSlot`, also runs hiprune_ops.qk_scores on the q and k it was given. So:
- every layer keeps its implementation (SDPA, flash, eager): the wrapper calls exactly what was there before;
- no output_attentions, no (L, L) map: qk_scores needs O(B * H * L) extra memory;
- unmarked modules (the other layers, the language model, other models) pay one attribute lookup.
In a marked SDPA layer whose call SDPA would run on its flash kernel (no mask, no dropout, not causal), the wrapper
calls that same flash kernel directly, which also returns each row's log-sum-exp, and hands it to qk_scores: one
pass over q and k instead of two, and the layer's output is the one SDPA computes. Everywhere else (a mask,
another kernel choice, eager or flash-attn layers, torch.compile) it keeps the two-pass qk_scores.
The wrappers are reference counted and removed when the last marked module is released.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional

import torch

from .. import ops

_SLOT_ATTR = "_hiprune_score_slot"
_lock = threading.Lock()
# (kind, name) -> [original function, reference count]; kind "interface" (AttentionInterface entry) or "eager"
# (a modeling module's eager_attention_forward global).
_installed: dict[tuple[str, str], list] = {}


class ScoreSlot:
    """Collects the received-attention scores of one attention module during one forward.

    Every call of the module's attention kernel appends one tensor: (B, L - num_prefix) for padded batches, or
    (T,) for packed ones (cu_seqlens given, or a Qwen2.5-VL segment called alone).
    """

    def __init__(self, num_prefix: int = 0):
        self.num_prefix = num_prefix
        self.scores: list[torch.Tensor] = []
        # cu_seqlens of images a tower packs into one sequence behind a block-diagonal mask (Pixtral), set by the
        # family around each tower call: the mask is then scored as these packed segments.
        self.segments: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.scores = []

    def single_score(self, layer: int) -> torch.Tensor:
        """The one tensor a tower forward recorded for its 1-based `layer`; any other count is an error."""
        if len(self.scores) != 1:
            raise RuntimeError(f"hiprune: layer {layer} of the vision tower recorded {len(self.scores)} attention "
                               "calls, expected 1 (was the attention implementation changed after patching?)")
        return self.scores[0]

    def record(self, query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict,
               lse: Optional[torch.Tensor] = None) -> None:
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        real = None
        if attention_mask is not None and not isinstance(attention_mask, dict):
            if self.segments is not None:
                cu_seqlens = self.segments
            else:
                real = key_padding(attention_mask, query.shape[0], query.shape[2], key.shape[2])
                if real is None:
                    raise NotImplementedError("hiprune: a captured vision layer received an attention mask that is "
                                              "not a key-padding mask; only padded patches may be masked")
        scale = kwargs.get("scaling")
        if scale is None:
            scale = query.shape[-1] ** -0.5
        if query.shape[1] != key.shape[1]:  # grouped kv heads: expand like the kernels do
            key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        with torch.no_grad():  # scores only pick indices; no graph through them
            if real is not None:
                self._record_real(query, key, float(scale), real)
            else:
                self._record(query, key, float(scale), cu_seqlens, lse)

    def _record_real(self, query, key, scale, real) -> None:
        """A padded batch behind a key-padding mask: each row's real tokens scored as one packed segment (softmax
        over its real keys, mean over its real queries); padded positions score 0. -> (B, L - num_prefix)."""
        counts = real.sum(dim=1)
        q = query.transpose(1, 2)[real]  # (T, H, D): the real tokens, row after row
        k = key.transpose(1, 2)[real]
        cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        scores = torch.zeros(real.shape, dtype=torch.float32, device=query.device)
        scores[real] = ops.qk_scores(q, k, scale, 0, cu_seqlens)
        self.scores.append(scores[:, self.num_prefix:])

    def _record(self, query, key, scale, cu_seqlens, lse) -> None:
        if cu_seqlens is not None:
            # Packed (flash) layout: (1, H, T, D) with segment bounds -> (T,) scores, each within its segment.
            q = query[0].transpose(0, 1)
            k = key[0].transpose(0, 1)
            self.scores.append(ops.qk_scores(q, k, scale, 0, cu_seqlens.to(torch.int32), lse))
        else:
            self.scores.append(ops.qk_scores(query, key, scale, self.num_prefix, None, lse))


def key_padding(attention_mask: torch.Tensor, batch: int, queries: int, keys: int) -> Optional[torch.Tensor]:
    """(B, L) bool, True at real tokens, when the mask (bool: True attends; float: additive) only hides padded keys
    (every real query attends exactly the real keys; padded queries are not looked at); None for any other mask
    (causal, block-diagonal, ...)."""
    if attention_mask.dim() != 4 or queries != keys:
        return None
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed.expand(batch, -1, queries, keys)
    real = allowed.any(dim=(1, 2))
    rows = allowed.transpose(1, 2)[real]  # (real queries, heads, keys)
    row_real = real.unsqueeze(1).expand(-1, queries, -1)[real]
    if not bool((rows == row_real.unsqueeze(1)).all()):
        return None
    return real


class LayerScores:
    """The capture interface both frameworks implement: the received-attention scores of chosen tower layers
    during one tower run. transformers: SlotScores below (the attention-interface hook); vLLM: vllm.scores.TowerTaps
    (a forward pre-hook on vLLM's encoder attention).

        capture.arm(); try: run the tower; scores = capture.take() finally: capture.disarm()

    or `output, scores = capture.scored(lambda: tower(...))`. take() gives one tensor per captured layer, in the
    order the layers were given.
    """

    def arm(self) -> None:
        raise NotImplementedError

    def take(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def disarm(self) -> None:
        raise NotImplementedError

    def scored(self, run: Callable[[], object]):
        """(run()'s result, take()): the tower run with the capture armed, disarmed after, also on error."""
        self.arm()
        try:
            result = run()
            return result, self.take()
        finally:
            self.disarm()


class SlotScores(LayerScores):
    """The transformers capture of a tower's layers: each layer's attention module carries a ScoreSlot (attach()).

    one_call: each layer must record exactly one call, returned as it came ((B, N) padded, (T,) packed): a tower
    that runs its images in one batch. Otherwise every call of a layer is flattened and concatenated in call order
    (Qwen-style towers, one call per segment or window group).
    """

    def __init__(self, modules: list[torch.nn.Module], layers: list[int], num_prefix: int = 0,
                 one_call: bool = True):
        self.modules, self.layers, self.num_prefix, self.one_call = modules, layers, num_prefix, one_call
        self.segments: Optional[torch.Tensor] = None
        self._attached: list[torch.nn.Module] = []

    def attach(self) -> "SlotScores":
        """Marks the layers' modules (those no one marked yet); detach() releases what this capture marked."""
        self._attached = attach_all(self.modules, self.num_prefix)
        return self

    def detach(self) -> None:
        for module in self._attached:
            detach(module)
        self._attached = []

    def _slots(self) -> list[ScoreSlot]:
        slots = [slot_of(module) for module in self.modules]
        if any(slot is None for slot in slots):
            raise RuntimeError("hiprune: a captured layer lost its capture (remove_hiprune during a forward?)")
        return slots

    def arm(self, segments: Optional[torch.Tensor] = None) -> None:
        for slot in self._slots():
            slot.reset()
            slot.segments = segments

    def take(self) -> list[torch.Tensor]:
        scores = []
        for slot, layer in zip(self._slots(), self.layers):
            if self.one_call:
                scores.append(slot.single_score(layer))
            elif not slot.scores:
                raise RuntimeError(f"hiprune: block {layer} of the vision tower recorded no attention call")
            else:
                scores.append(torch.cat([s.reshape(-1) for s in slot.scores]))
        return scores

    def disarm(self) -> None:
        for module in self.modules:
            slot = slot_of(module)
            if slot is not None:
                slot.reset()
                slot.segments = None


def _sdpa_forward():
    from .hf._transformers_api import sdpa_attention_forward
    return sdpa_attention_forward()


# What sdpa_attention_forward reads from its keyword arguments besides these is ignored by it; any of these set
# changes what it computes, so the flash shortcut is not taken.
_SDPA_SHORTCUT_BLOCKERS = ("position_bias", "cache", "softcap")
# SDPA's kernel choices (torch._fused_sdp_choice) whose lse we can take.
SDP_FLASH = int(torch.nn.attention.SDPBackend.FLASH_ATTENTION.value)
SDP_EFFICIENT = int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION.value)


def _sdpa_flash_with_lse(module, query, key, value, attention_mask, args, kwargs):
    """(output, lse) with the output exactly as transformers' SDPA forward computes it, when SDPA would run its
    flash kernel (or, on CUDA, its memory-efficient one) for this call; None otherwise. lse: (B, H, L) float32,
    natural log."""
    if args or attention_mask is not None or kwargs.get("output_attentions"):
        return None
    if any(kwargs.get(name) is not None for name in _SDPA_SHORTCUT_BLOCKERS):
        return None
    if kwargs.get("dropout", 0.0) != 0.0 or getattr(module, "num_key_value_groups", 1) > 1:
        return None
    if not (query.dtype == key.dtype == value.dtype) or query.shape[1] != key.shape[1]:
        return None
    if torch.compiler.is_compiling():
        return None
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if query.shape[2] > 1 and is_causal:
        return None
    scaling = kwargs.get("scaling")
    choice = torch._fused_sdp_choice(query, key, value, None, 0.0, False, scale=scaling)
    if query.device.type == "cpu" and choice == SDP_FLASH:
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=None, scale=scaling)
    elif query.device.type == "cuda" and choice == SDP_FLASH and query.shape[-1] % 8 == 0:
        # SDPA passes flash this scale (1 / sqrt(D) when none is given); D % 8 == 0: it pads nothing.
        scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False,
                                                                         scale=scale)[:2]
    elif query.device.type == "cuda" and choice == SDP_EFFICIENT:
        output, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, 0.0,
                                                                             False, scale=scaling)[:2]
        lse = lse[..., :query.shape[2]]  # padded to a multiple of 32 rows
    else:
        return None
    # The tail of sdpa_attention_forward: (B, H, L, D) -> (B, L, H, D), contiguous.
    output = output.reshape(output.shape[0], -1, query.shape[2], value.shape[-1]).transpose(1, 2).contiguous()
    return output, lse


def _wrap(original: Callable) -> Callable:
    def hiprune_capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
        slot = getattr(module, _SLOT_ATTR, None)
        if slot is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        fused = None
        if original is _sdpa_forward():
            fused = _sdpa_flash_with_lse(module, query, key, value, attention_mask, args, kwargs)
        if fused is None:
            result = original(module, query, key, value, attention_mask, *args, **kwargs)
            slot.record(query, key, attention_mask, kwargs)
            return result
        output, lse = fused
        slot.record(query, key, attention_mask, kwargs, lse)
        return output, None

    hiprune_capturing_attention.__wrapped__ = original
    return hiprune_capturing_attention


def _attention_functions() -> dict:
    from .hf._transformers_api import attention_functions
    return attention_functions()


def _eager_owner(module_name: str):
    from .hf._transformers_api import eager_attention_owner
    return eager_attention_owner(module_name)


def _target(module: torch.nn.Module) -> tuple[str, str]:
    name = getattr(module.config, "_attn_implementation", None) or "eager"
    if name != "eager" and name in _attention_functions():
        return ("interface", name)
    if name == "eager":
        return ("eager", type(module).__module__)
    raise NotImplementedError(f"hiprune: attention implementation {name!r} is not in transformers' "
                              "AttentionInterface; cannot capture q and k")


def _install(target: tuple[str, str]) -> None:
    kind, name = target
    entry = _installed.get(target)
    if entry is not None:
        entry[1] += 1
        return
    if kind == "interface":
        mapping = _attention_functions()
        original = mapping[name]
        mapping[name] = _wrap(original)
    else:
        modeling = _eager_owner(name)
        original = modeling.eager_attention_forward
        modeling.eager_attention_forward = _wrap(original)
    _installed[target] = [original, 1]


def _uninstall(target: tuple[str, str]) -> None:
    entry = _installed.get(target)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    kind, name = target
    if kind == "interface":
        _attention_functions()[name] = entry[0]
    else:
        _eager_owner(name).eager_attention_forward = entry[0]
    del _installed[target]


def attach(module: torch.nn.Module, num_prefix: int = 0) -> ScoreSlot:
    """Marks an attention module so its q and k are scored; returns the slot that collects the scores."""
    if _SLOT_ATTR in module.__dict__:
        raise RuntimeError(f"hiprune: {type(module).__name__} is already captured (apply_hiprune twice?)")
    with _lock:
        target = _target(module)
        _install(target)
    slot = ScoreSlot(num_prefix)
    module.__dict__[_SLOT_ATTR] = slot
    module.__dict__["_hiprune_capture_target"] = target
    return slot


def attach_all(modules, num_prefix: int = 0) -> list[torch.nn.Module]:
    """Attaches every module that has no slot yet (a module listed twice once); returns those it attached, the ones
    its caller detaches later (modules another caller attached stay with that caller)."""
    attached = []
    for module in modules:
        if slot_of(module) is None:
            attach(module, num_prefix)
            attached.append(module)
    return attached


def detach(module: torch.nn.Module) -> None:
    """Undoes attach(): the module loses its slot, and the kernel wrapper goes when no module needs it."""
    module.__dict__.pop(_SLOT_ATTR, None)
    target = module.__dict__.pop("_hiprune_capture_target", None)
    if target is not None:
        with _lock:
            _uninstall(target)


def slot_of(module: torch.nn.Module) -> Optional[ScoreSlot]:
    return module.__dict__.get(_SLOT_ATTR)
