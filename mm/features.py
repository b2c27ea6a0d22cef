"""Audio features: what the speech modality net reads, computed the same way when preparing
shards and when predicting from a file.

Log-mel filterbanks (torchaudio): 80 bins, 25 ms windows every 10 ms at 16 kHz by default
(`DataConfig`), stored as float16 [frames, bins].
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torchaudio

from mm.batch import LOG_MEL_FLOOR


@lru_cache(maxsize=8)
def _mel(
    sample_rate: int, bins: int, window_ms: float, hop_ms: float
) -> torchaudio.transforms.MelSpectrogram:
    win = round(sample_rate * window_ms / 1000)
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=2 ** math.ceil(math.log2(win)),
        win_length=win,
        hop_length=round(sample_rate * hop_ms / 1000),
        n_mels=bins,
    )


def log_mel(
    waveform: torch.Tensor,
    source_rate: int,
    sample_rate: int = 16000,
    bins: int = 80,
    window_ms: float = 25.0,
    hop_ms: float = 10.0,
) -> torch.Tensor:
    """Mono waveform [samples] at `source_rate` -> float16 log-mel frames [frames, bins]."""
    waveform = waveform.float()
    if source_rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, source_rate, sample_rate)
    with torch.no_grad():
        mel = _mel(sample_rate, bins, float(window_ms), float(hop_ms))(waveform)
    return torch.log(mel + LOG_MEL_FLOOR).T.contiguous().half()
