"""Media files into what the modality nets read, the same way when preparing shards and when
predicting from a user's file. A file that cannot be decoded is a `MediaError`.

Images: Pillow, converted to RGB (every image task shares the 3-channel net, and one task's
images must all have one shape to be batched; a grey corpus pays 3x the bytes, for
Fashion-MNIST's 70k images 165 MB before compression), short side resized to `size`, then
centre-cropped to `size` x `size`, uint8 [H, W, 3].

Audio: soundfile (torchaudio.load would need FFmpeg), mixed to mono, resampled, and turned into
log-mel filterbanks by torchaudio: 80 bins, 25 ms windows every 10 ms at 16 kHz by default
(`DataConfig`), float16 [frames, bins].
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from mm.batch import LOG_MEL_FLOOR

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


class MediaError(Exception):
    """A file that is missing or cannot be decoded. `reason` is a stable snake_case name (the
    manifest counts rejected rows by it); `detail` names the file."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class AudioSettings:
    sample_rate: int = 16000
    mel_bins: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0


# ------------------------------------------------------------------------------------- images


def load_image(path: str, size: int) -> np.ndarray:
    """Decode, RGB, short side to `size`, centre crop: uint8 [size, size, 3]."""
    if not os.path.isfile(path):
        raise MediaError("missing_image", path)
    try:
        with Image.open(path) as image:
            # JPEG only: let libjpeg decode at a reduced scale that still covers `size` (much
            # faster for ImageNet-sized photos); a no-op for other formats.
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise MediaError("undecodable_image", str(err)) from None  # names the file
    return np.asarray(centre_crop(resize_short_side(rgb, size), size), dtype=np.uint8)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if min(width, height) == size:
        return image
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    return image.resize(new_size, Image.Resampling.BILINEAR)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


# -------------------------------------------------------------------------------------- audio


def load_log_mel(path: str, audio: AudioSettings) -> np.ndarray:
    """Read, mix to mono, resample, log-mel: float16 [frames, bins]."""
    import soundfile
    import torch

    if not os.path.isfile(path):
        raise MediaError("missing_audio", path)
    if os.path.getsize(path) == 0:
        raise MediaError("empty_audio", path)  # what soundfile writes for a FLAC without samples
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise MediaError("unreadable_audio", str(err)) from None  # names the file
    if samples.shape[0] == 0:
        raise MediaError("empty_audio", path)
    mono = torch.from_numpy(samples.mean(axis=1))
    features = log_mel(mono, rate, audio.sample_rate, audio.mel_bins, audio.window_ms, audio.hop_ms)
    return features.numpy()


def log_mel(
    waveform,
    source_rate: int,
    sample_rate: int = 16000,
    bins: int = 80,
    window_ms: float = 25.0,
    hop_ms: float = 10.0,
):
    """Mono waveform tensor [samples] at `source_rate` -> float16 log-mel frames [frames, bins]."""
    import torch
    import torchaudio  # here, not at the top: only speech workers pay for importing it

    waveform = waveform.float()
    if source_rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, source_rate, sample_rate)
    with torch.no_grad():
        mel = _mel(sample_rate, bins, float(window_ms), float(hop_ms))(waveform)
    return torch.log(mel + LOG_MEL_FLOOR).T.contiguous().half()


@lru_cache(maxsize=8)
def _mel(sample_rate: int, bins: int, window_ms: float, hop_ms: float):
    import torchaudio

    win = round(sample_rate * window_ms / 1000)
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate,
        n_fft=2 ** math.ceil(math.log2(win)),
        win_length=win,
        hop_length=round(sample_rate * hop_ms / 1000),
        n_mels=bins,
    )
