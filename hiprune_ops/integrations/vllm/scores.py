"""Received-attention scores from vLLM's own ViT attention modules, tensor-parallel aware. Torch only.

QKTap hooks one MMEncoderAttention (a forward pre-hook: the module and its backend run unchanged) and, while
armed, turns the q and k it is called with into per-token SUMS over its heads with hiprune_ops.qk_scores:
- padded (B, L, H * D) or (B, L, H, D) inputs (CLIP): (B, L - num_prefix) sums;
- packed (1, T, H, D) inputs with cu_seqlens (Qwen2.5-VL's windowed tower): (T,) sums, each within its segment.

Tensor parallelism. With the ViT's heads sharded across ranks (vLLM's mm_encoder_tp_mode="weights"), each rank sees
only its heads. Sums over disjoint head sets add up, so one all-reduce of the (N,) float32 partial sums, divided
by the total head count, gives every rank the mean over all heads: the same scores, hence the same tokens
(finish_scores). With mm_encoder_tp_mode="data" every rank runs whole images; the scores travel beside the
embeddings through vLLM's gather, bit for bit (pack_scores / unpack_scores), and the selection runs after it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ... import ops
from ..capture import LayerScores


class QKTap:
    """Scores of one attention module; `arm()` before the tower runs, `take()` after."""

    def __init__(self, module: torch.nn.Module, num_prefix: int = 0):
        self.module = module
        self.num_prefix = num_prefix
        self.armed = False
        self.sums: list[torch.Tensor] = []
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def arm(self) -> None:
        self.sums = []
        self.armed = True

    def take(self) -> torch.Tensor:
        self.armed = False
        sums, self.sums = self.sums, []
        if not sums:
            raise RuntimeError(f"hiprune: the tapped attention module {type(self.module).__name__} was not called "
                               "while the tower ran")
        return sums[0] if len(sums) == 1 else torch.cat(sums, dim=-1)

    def _hook(self, module, args, kwargs):
        if not self.armed:
            return None
        names = ("query", "key", "value", "cu_seqlens")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        with torch.no_grad():
            self.sums.append(head_sums(bound["query"], bound["key"], module.num_heads, module.num_kv_heads,
                                       module.head_size, float(module.scale), self.num_prefix,
                                       bound.get("cu_seqlens")))
        return None


class TowerTaps(LayerScores):
    """The vLLM capture (capture.LayerScores): the object and deep layer taps of one tower, their scores reduced
    over the tensor-parallel group (all_reduce: a sum over it, or None with one rank or whole heads)."""

    def __init__(self, attention_modules: Sequence[torch.nn.Module], total_heads: int, all_reduce,
                 num_prefix: int = 0):
        self.taps = [QKTap(module, num_prefix) for module in attention_modules]
        self.total_heads = total_heads
        self.all_reduce = all_reduce

    def arm(self) -> None:
        for tap in self.taps:
            tap.arm()

    def disarm(self) -> None:
        for tap in self.taps:
            tap.armed = False
            tap.sums = []

    def take(self) -> list[torch.Tensor]:
        return [finish_scores(tap.take(), self.total_heads, self.all_reduce) for tap in self.taps]


def head_sums(q: torch.Tensor, k: torch.Tensor, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
              num_prefix: int = 0, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token sums over the given heads of the received attention (qk_scores' mean times the head count)."""
    if cu_seqlens is not None:
        # vLLM's packed layout: (1, T, H, D) -> (T, H, D)
        q = q.reshape(-1, num_heads, head_size)
        k = k.reshape(-1, num_kv_heads, head_size)
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        mean = ops.qk_scores(q, k, scale, 0, cu_seqlens.to(device=q.device, dtype=torch.int32))
    else:
        batch, length = q.shape[:2]
        q = q.reshape(batch, length, num_heads, head_size).transpose(1, 2)
        k = k.reshape(batch, k.shape[1], num_kv_heads, head_size).transpose(1, 2)
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        mean = ops.qk_scores(q, k, scale, num_prefix)
    return mean * num_heads


def finish_scores(sums: torch.Tensor, total_heads: int,
                  all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Partial head sums of this rank -> mean over all heads of all ranks (all_reduce: a sum over the TP group)."""
    if all_reduce is not None:
        sums = all_reduce(sums.contiguous())
    return sums / total_heads


def score_channels(dtype: torch.dtype, layers: int = 2) -> int:
    """Channels that `layers` float32 scores per token take when packed into an embedding of `dtype`."""
    return layers * 4 // torch.empty((), dtype=dtype).element_size()


def pack_scores(embeddings: torch.Tensor, scores: list[torch.Tensor]) -> torch.Tensor:
    """(T, C) embeddings + per-layer (T,) float32 scores -> (T, C + channels): the scores' bits, not their values,
    so any copy (all-gather, slicing) carries them exactly."""
    packed = torch.stack([s.to(torch.float32) for s in scores], dim=1).contiguous().view(embeddings.dtype)
    return torch.cat([embeddings, packed.to(embeddings.device)], dim=1)


def unpack_scores(packed: torch.Tensor, layers: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of pack_scores: (embeddings (T, C), [(T,) float32] * layers)."""
    channels = score_channels(packed.dtype, layers)
    embeddings, bits = packed[:, :-channels], packed[:, -channels:].contiguous()
    scores = bits.view(torch.float32)
    return embeddings, [scores[:, i] for i in range(layers)]
