"""Modality nets: into the shared d-dimensional sequence, and out of it.

One net per modality, shared by every task of that modality (paper, section 2.1):

    image in   Xception entry flow (2-D), flattened to a sequence of positions
    audio in   the same residual blocks in 1-D over time, mel bins as channels
    text in    embedding * sqrt(d), the padding id embedded as zeros
    text out   linear to the vocabulary
    class out  Xception exit flow over the sequence, global average pooling, linear

The class head is the one per-task part: class sets differ between tasks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mm.config import SpecAugmentConfig
from mm.layers import ChannelNorm, SeparableConv


def downsample_mask(mask: Tensor | None) -> Tensor | None:
    """The mask after a kernel-3, stride-2, pad-1 layer: ceil(length / 2) positions stay real."""
    if mask is None:
        return None
    lengths = (mask.sum(1) + 1) // 2
    return torch.arange((mask.shape[1] + 1) // 2, device=mask.device)[None, :] < lengths[:, None]


def masked_channels_first(x: Tensor, mask: Tensor | None, fill: float = 0.0) -> Tensor:
    """Fill the padded time steps of a [B, C, T] tensor."""
    if mask is None:
        return x
    return x.masked_fill(~mask[:, None, :], fill)


class ResidualDownBlock(nn.Module):
    """Xception's residual block: two separable 3x3 convs and a strided 3x3 max-pool, plus a
    strided 1x1 conv on the skip path. Channels-first, 1-D (maskable over time) or 2-D.
    With stride 1 the same block keeps the resolution."""

    def __init__(self, c_in: int, c_out: int, dims: int, stride: int = 2):
        super().__init__()
        self.dims, self.stride = dims, stride
        self.sep1, self.norm1 = SeparableConv(c_in, c_out, 3, dims), ChannelNorm(c_out)
        self.sep2, self.norm2 = SeparableConv(c_out, c_out, 3, dims), ChannelNorm(c_out)
        self.skip = (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, 1, stride=stride)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = masked_channels_first(x, mask)
        h = self.norm1(self.sep1(F.relu(x)))
        h = self.norm2(self.sep2(masked_channels_first(F.relu(h), mask)))
        pool = F.max_pool1d if self.dims == 1 else F.max_pool2d
        h = pool(masked_channels_first(h, mask, float("-inf")), 3, self.stride, 1)
        mask = downsample_mask(mask) if self.stride == 2 else mask
        return masked_channels_first(h + self.skip(x), mask), mask


class XceptionEntry(nn.Module):
    """conv 3x3 stride 2 to 32, conv 3x3 to 64, then residual blocks to min(128,d), min(256,d), d.
    The first `strided_blocks` residual blocks halve the resolution (all three: 16x in all)."""

    def __init__(self, c_in: int, d: int, dims: int, strided_blocks: int = 3):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv1, self.norm1 = conv(c_in, 32, 3, stride=2, padding=1), ChannelNorm(32)
        self.conv2, self.norm2 = conv(32, 64, 3, padding=1), ChannelNorm(64)
        widths = [64, min(128, d), min(256, d), d]
        self.blocks = nn.ModuleList(
            ResidualDownBlock(a, b, dims, stride=2 if i < strided_blocks else 1)
            for i, (a, b) in enumerate(zip(widths, widths[1:]))
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = F.relu(self.norm1(self.conv1(masked_channels_first(x, mask))))
        mask = downsample_mask(mask)
        x = F.relu(self.norm2(self.conv2(masked_channels_first(x, mask))))
        for block in self.blocks:
            x, mask = block(x, mask)
        return x, mask


class ImageInput(nn.Module):
    """uint8 images [B, H, W, C] -> [B, H/32 * W/32, d]. Grey images are repeated to RGB."""

    def __init__(self, d: int, channels: int = 3):
        super().__init__()
        self.channels = channels
        self.entry = XceptionEntry(channels, d, dims=2)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x[:, : self.channels]
        x, _ = self.entry(x)
        x = x.flatten(2).transpose(1, 2)
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)


class AudioInput(nn.Module):
    """Log-mel frames [B, T, bins] with lengths [B] -> [B, ~T/downsampling, d], striding over
    time only (downsampling 2, 4, 8 or 16). In training, SpecAugment masks when configured."""

    def __init__(self, d: int, bins: int, downsampling: int = 16, masking: SpecAugmentConfig | None = None):
        super().__init__()
        self.entry = XceptionEntry(bins, d, dims=1, strided_blocks=int(math.log2(downsampling)) - 1)
        self.masking = masking or SpecAugmentConfig()

    def forward(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        mask = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]
        x = normalize_utterances(frames.float(), mask)
        if self.training and (self.masking.freq_masks or self.masking.time_masks):
            x = spec_augment(x, lengths, self.masking)
        x, mask = self.entry(x.transpose(1, 2), mask)
        return x.transpose(1, 2), mask


def spec_augment(x: Tensor, lengths: Tensor, masking: SpecAugmentConfig) -> Tensor:
    """Zero bands of mel bins and spans of real frames of normalised features [B, T, bins],
    independently per utterance (zero is the utterance's mean after normalising)."""
    batch, frames, bins = x.shape
    keep = torch.ones(batch, frames, bins, dtype=torch.bool, device=x.device)
    for _ in range(masking.freq_masks):
        band = _random_spans(torch.full((batch,), bins, device=x.device), masking.freq_width, bins)
        keep &= ~band[:, None, :]
    for _ in range(masking.time_masks):
        widest = (lengths.float() * masking.time_width).long()
        keep &= ~_random_spans(lengths, widest, frames)[:, :, None]
    return x * keep


def _random_spans(lengths: Tensor, widest: Tensor | int, size: int) -> Tensor:
    """[B, size] True on one span per row, of width uniform in 0..widest, inside 0..length."""
    rows = len(lengths)
    widest = torch.as_tensor(widest, device=lengths.device).expand(rows)
    width = (torch.rand(rows, device=lengths.device) * (widest + 1)).long().minimum(lengths)
    start = (torch.rand(rows, device=lengths.device) * (lengths - width + 1)).long()
    positions = torch.arange(size, device=lengths.device)[None, :]
    return (positions >= start[:, None]) & (positions < (start + width)[:, None])


def normalize_utterances(frames: Tensor, mask: Tensor) -> Tensor:
    """Zero mean, unit variance per utterance and mel bin, over its real frames."""
    weight = mask.unsqueeze(-1).to(frames.dtype)
    count = weight.sum(1, keepdim=True).clamp(min=1)
    mean = (frames * weight).sum(1, keepdim=True) / count
    var = ((frames - mean) ** 2 * weight).sum(1, keepdim=True) / count
    return (frames - mean) / (var + 1e-5).sqrt() * weight


class TextInput(nn.Embedding):
    """Token ids -> embedding * sqrt(d); id 0 (padding) embeds as zeros."""

    def __init__(self, vocab_size: int, d: int):
        super().__init__(vocab_size, d, padding_idx=0)
        nn.init.normal_(self.weight, std=d**-0.5)
        with torch.no_grad():
            self.weight[0].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * math.sqrt(self.embedding_dim)


class ClassOutput(nn.Module):
    """Xception exit flow on the body's sequence: a residual down block, separable convs to
    1.5d and 2d with ReLU, global average pooling over the real positions, linear."""

    def __init__(self, d: int, num_classes: int):
        super().__init__()
        wide, widest = d * 3 // 2, d * 2
        self.block = ResidualDownBlock(d, d, dims=1)
        self.sep1, self.norm1 = SeparableConv(d, wide, 3), ChannelNorm(wide)
        self.sep2, self.norm2 = SeparableConv(wide, widest, 3), ChannelNorm(widest)
        self.classify = nn.Linear(widest, num_classes)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h, mask = self.block(x.transpose(1, 2), mask)
        h = F.relu(self.norm1(self.sep1(masked_channels_first(h, mask))))
        h = F.relu(self.norm2(self.sep2(masked_channels_first(h, mask))))
        weight = mask.unsqueeze(1).to(h.dtype)
        pooled = (h * weight).sum(-1) / weight.sum(-1).clamp(min=1)
        return self.classify(pooled)
