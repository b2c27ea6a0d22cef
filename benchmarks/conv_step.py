"""The body's conv step, forward and backward: depthwise taps as shifted multiply-adds on
channels-last tensors (`SeparableConv.forward_channels_last`, what `ConvStep` runs) against the
grouped convolution with its transposes (`SeparableConv.forward`, what it ran before).

Both use the same weights on [32, 48, 96] (the starter's batch, a translation length, its
width), kernel 5 dilated by 2, causal as in the decoder. Prints the ratio of their median
seconds (grouped ÷ channels-last: > 1 means the channels-last path is faster).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import compare, emit
from mm.layers import SeparableConv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 48, 96], metavar=("B", "T", "D"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, length, width = args.shape
    conv = SeparableConv(width, width, kernel=5, dilation=2, padding="causal")
    norm = torch.nn.LayerNorm(width)
    x = torch.randn(batch, length, width, requires_grad=True)

    def channels_last():
        norm(conv.forward_channels_last(F.relu(x))).sum().backward()

    def grouped():
        norm(conv(F.relu(x).transpose(1, 2)).transpose(1, 2)).sum().backward()

    fast, slow = compare(channels_last, grouped, repeats=30, warmup=5)
    emit(
        {
            "benchmark": "conv_step",
            "ratio": slow / fast,
            "channels_last_ms": fast * 1e3,
            "grouped_ms": slow * 1e3,
            "shape": args.shape,
            "threads": args.threads,
        }
    )


if __name__ == "__main__":
    main()
