"""The MultiModel's building blocks (Kaiser et al. 2017, section 2).

    ConvStep(x)  = LayerNorm(SeparableConv(ReLU(x)))
    ConvBlock(x) = four conv steps, residual after the second and the fourth, then dropout
    AttentionBlock(target, source) = timing signal, two conv steps, masked multi-head
                   self-attention, then attention to the source

Sequences are [batch, time, channels] with a boolean mask [batch, time] that is True at real
positions. Padded positions are zeroed before every convolution, so extra padding changes
nothing at real positions. A causal layer pads on the left only and can run one position at a
time from a `DecodeState`, which keeps what it needs of the past (the last inputs of each
convolution, the keys and values of each attention).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DecodeState(dict):
    """Per-module caches for incremental decoding, keyed by module."""

    def cache(self, module: nn.Module) -> dict[str, Any]:
        return self.setdefault(module, {})

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows `index` (beam search re-ranks its hypotheses every step). Tuples
        are what every hypothesis of a row shares (its source's keys and values, the fused conv
        matrices) and stay as they are."""
        for cache in self.values():
            for key, value in cache.items():
                if isinstance(value, Tensor) and value.dim() > 0:
                    cache[key] = value.index_select(0, index)


def masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded positions of a [B, T, C] tensor (whatever they hold, inf and NaN too)."""
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first tensor [B, C, *spatial]."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class SeparableConv(nn.Module):
    """Depthwise convolution, then a pointwise one; channels-first, 1-D or 2-D.

    padding "same" keeps the length (odd kernels); "causal" pads on the left only, so no
    position sees a later one, and may continue from the inputs cached in `cache`.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        dims: int = 1,
        dilation: int = 1,
        stride: int | tuple[int, ...] = 1,
        padding: str = "same",
    ):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.reach = (kernel - 1) * dilation  # how many neighbours a position sees
        self.causal = padding == "causal"
        pad = 0 if self.causal else self.reach // 2
        self.depthwise = conv(c_in, c_in, kernel, stride, pad, dilation, groups=c_in, bias=False)
        self.pointwise = conv(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Channels-first [B, C, *spatial] (the modality nets)."""
        if self.causal:
            x = F.pad(x, (self.reach, 0))
        return self.pointwise(self.depthwise(x))

    def forward_channels_last(self, x: Tensor, cache: dict[str, Any] | None = None) -> Tensor:
        """1-D, channels-last [B, T, C] (the body), stride 1, the same weights as `forward`.

        The depthwise kernel is applied as one multiply-add per tap on shifted views: at the
        body's small widths this is about twice as fast (forward and backward) on CPU as a
        grouped convolution with the transposes around it, and it needs no transposes at all.
        """
        decoding_one = self.causal and cache is not None and x.shape[1] == 1
        if self.causal:
            x = self._left_context(x, cache)
        elif self.reach:
            x = F.pad(x, (0, 0, self.reach // 2, self.reach // 2))
        dilation = self.depthwise.dilation[0]
        if decoding_one:  # one new position: its taps are every dilation-th of the window
            matrix, bias = self._fused_weights(cache)
            return torch.addmm(bias, x[:, ::dilation].flatten(1), matrix).unsqueeze(1)
        length = x.shape[1] - self.reach
        weight = self.depthwise.weight[:, 0, :]  # [C, kernel]
        h = x[:, :length] * weight[:, 0]
        for tap in range(1, weight.shape[1]):
            h = h + x[:, tap * dilation : tap * dilation + length] * weight[:, tap]
        return F.linear(h, self.pointwise.weight[:, :, 0], self.pointwise.bias)

    def _fused_weights(self, cache: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Depthwise and pointwise as one [kernel * C, C_out] matrix over a position's taps.

        Decoding one token is a few dozen tiny kernels per layer, each costing its launch more
        than its FLOPs: one matmul instead of a multiply, a sum and a matmul. The matrix is
        stored input-major: with two threads, BLAS multiplies [8, 192] by a transposed
        [64, 192] weight (what `F.linear` passes) in about twice the time it takes for the
        same weight laid out [192, 64] (README "Results"). Made once per decoding (kept in its
        cache, as a tuple so that beam reordering leaves it alone), never kept on the module:
        fused Adam updates the weights without bumping their version counter, so a matrix kept
        across optimiser steps would silently decode with old weights.
        """
        fused = cache.get("fused")
        if fused is None:
            depthwise, pointwise = self.depthwise.weight, self.pointwise.weight
            with torch.no_grad():  # out[t*C + c, o] = dw[c, t] * pw[o, c]
                taps, mix = depthwise[:, 0, :].t(), pointwise[:, :, 0].t()  # [kernel, C], [C, C_out]
                matrix = (taps[:, :, None] * mix[None]).flatten(0, 1).contiguous()
            fused = cache["fused"] = (matrix, self.pointwise.bias)
        return fused

    def _left_context(self, x: Tensor, cache: dict[str, Any] | None) -> Tensor:
        """[B, T, C] with the `reach` positions before it: zeros, or the cached past."""
        if self.reach == 0:
            return x
        past = None if cache is None else cache.get("past")
        if past is None:
            past = x.new_zeros(x.shape[0], self.reach, x.shape[2])
        x = torch.cat([past, x], dim=1)
        if cache is not None:
            cache["past"] = x[:, -self.reach :]
        return x


class ConvStep(nn.Module):
    """LayerNorm(SeparableConv(ReLU(x))) on [B, T, d]."""

    def __init__(self, d: int, kernel: int, dilation: int, causal: bool):
        super().__init__()
        self.conv = SeparableConv(d, d, kernel, dilation=dilation, padding="causal" if causal else "same")
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, mask: Tensor | None, state: DecodeState | None = None) -> Tensor:
        h = masked(F.relu(x), mask)
        return self.norm(self.conv.forward_channels_last(h, None if state is None else state.cache(self)))


class ConvBlock(nn.Module):
    """Four conv steps with residual connections after the second and the fourth."""

    def __init__(self, d: int, kernels: list[tuple[int, int]], causal: bool, dropout: float):
        super().__init__()
        self.steps = nn.ModuleList(ConvStep(d, k, dil, causal) for k, dil in kernels)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor | None, state: DecodeState | None = None) -> Tensor:
        h1 = self.steps[0](x, mask, state)
        h2 = x + self.steps[1](h1, mask, state)
        h3 = self.steps[2](h2, mask, state)
        h4 = h2 + self.steps[3](h3, mask, state)
        return self.dropout(h4)


def timing_signal(length: int, channels: int, offset: int = 0, device=None) -> Tensor:
    """Sines and cosines of geometrically spaced timescales (1 to 1e4), [length, channels].

    Rows of a table made once per width and device (a power of two long): decoding asks for
    one row per token, and computing it afresh was a dozen small kernels per attention block."""
    rows = max(1024, 1 << (offset + length - 1).bit_length())
    return _timing_table(rows, channels, torch.device(device or "cpu"))[offset : offset + length]


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)  # a normal tensor even when first asked for while decoding: training uses it too
def _timing_table(length: int, channels: int, device: torch.device) -> Tensor:
    position = torch.arange(length, dtype=torch.float32, device=device)
    num_timescales = channels // 2
    log_increment = math.log(1e4) / max(num_timescales - 1, 1)
    inv_timescales = torch.exp(-log_increment * torch.arange(num_timescales, device=device))
    scaled = position.unsqueeze(1) * inv_timescales.unsqueeze(0)
    signal = torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)
    return F.pad(signal, (0, channels % 2))


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention; self-attention when no memory is given."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(d, d)
        self.key_value = nn.Linear(d, 2 * d)  # the paper's two pointwise convs over the source
        self.out = nn.Linear(d, d)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        causal: bool = False,
        cache: dict[str, Any] | None = None,
    ) -> Tensor:
        q = self._split(self.query(x))
        k, v = self._keys_values(x if memory is None else memory, memory is not None, cache)
        # beam search: `copies` consecutive rows of x are hypotheses of one memory row, and
        # attend to it as one row's queries (one matmul per row, no copies of the memory)
        copies = len(q) // len(k)
        if copies > 1:
            q = q.unflatten(0, (-1, copies)).transpose(1, 2).flatten(2, 3)  # [B, heads, copies*T, d/h]
        mask = self._mask(q.shape[2], k.shape[2], memory_mask, causal, x.device)
        dropout = self.dropout if self.training else 0.0
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if copies > 1:
            h = h.unflatten(2, (copies, -1)).transpose(1, 2).flatten(0, 1)
        return self.out(h.transpose(1, 2).flatten(2))

    def _keys_values(
        self, source: Tensor, fixed: bool, cache: dict[str, Any] | None
    ) -> tuple[Tensor, Tensor]:
        if cache is not None and fixed and "source" in cache:
            return cache["source"]  # the encoder output does not change while decoding
        k, v = (self._split(t) for t in self.key_value(source).chunk(2, dim=-1))
        if cache is not None and fixed:
            cache["source"] = (k, v)  # a tuple: one per source row, which beam re-ranking keeps
            return k, v
        if cache is not None and "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        return k, v

    def _split(self, x: Tensor) -> Tensor:  # [B, T, d] -> [B, heads, T, d / heads]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    @staticmethod
    def _mask(queries: int, keys: int, key_mask: Tensor | None, causal: bool, device) -> Tensor | None:
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
        if causal and queries > 1:  # the queries are the last `queries` of `keys` positions
            query_pos = torch.arange(keys - queries, keys, device=device)
            allowed = torch.arange(keys, device=device)[None, :] <= query_pos[:, None]
            mask = allowed if mask is None else mask & allowed
        return mask


class AttentionBlock(nn.Module):
    """Timing signal, two causal conv steps, self-attention, then attention to the source."""

    def __init__(
        self, d: int, heads: int, kernels: list[tuple[int, int]], dropout: float, attention_dropout: float
    ):
        super().__init__()
        self.mix = nn.ModuleList(ConvStep(d, k, dil, causal=True) for k, dil in kernels[:2])
        self.self_attention = MultiHeadAttention(d, heads, attention_dropout)
        self.source_attention = MultiHeadAttention(d, heads, attention_dropout)
        self.norm_self, self.norm_source = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        target: Tensor,
        target_mask: Tensor | None,
        source: Tensor,
        source_mask: Tensor | None,
        state: DecodeState | None = None,
    ) -> Tensor:
        cache = None if state is None else state.cache(self)
        offset = 0 if cache is None else cache.get("position", 0)
        x = target + timing_signal(target.shape[1], target.shape[2], offset, target.device)
        if cache is not None:
            cache["position"] = offset + target.shape[1]
        x = x + self.mix[1](self.mix[0](x, target_mask, state), target_mask, state)
        self_cache = None if state is None else state.cache(self.self_attention)
        x = self.norm_self(x + self.dropout(self.self_attention(x, causal=True, cache=self_cache)))
        source_cache = None if state is None else state.cache(self.source_attention)
        attended = self.source_attention(x, source, source_mask, cache=source_cache)
        return self.norm_source(x + self.dropout(attended))
