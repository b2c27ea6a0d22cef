"""Decoding images and audio into what the modality nets read; a broken file is a `BadRow`.

Images: Pillow, converted to RGB (every image task shares the 3-channel net, and one task's
images must all have one shape to be batched; a grey corpus pays 3x the bytes, for
Fashion-MNIST's 70k images 165 MB before compression), short side resized to `size`, then
centre-cropped to `size` x `size`, uint8 [H, W, 3].

Audio: soundfile (torchaudio.load would need FFmpeg), mixed to mono, resampled and turned into
log-mel frames by `mm.features.log_mel`, float16 [frames, bins].
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from pipelines.rows import AudioSettings, BadRow

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def load_image(path: str, size: int) -> np.ndarray:
    """Decode, RGB, short side to `size`, centre crop: uint8 [size, size, 3]."""
    if not os.path.isfile(path):
        raise BadRow("missing_image", path)
    try:
        with Image.open(path) as image:
            # JPEG only: let libjpeg decode at a reduced scale that still covers `size` (much
            # faster for ImageNet-sized photos); a no-op for other formats.
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadRow("undecodable_image", str(err)) from None  # names the file
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


def load_log_mel(path: str, audio: AudioSettings) -> np.ndarray:
    """Read, mix to mono, resample, log-mel: float16 [frames, bins]."""
    import soundfile
    import torch

    from mm.features import log_mel  # imports torchaudio: only speech workers pay for it

    if not os.path.isfile(path):
        raise BadRow("missing_audio", path)
    if os.path.getsize(path) == 0:
        raise BadRow("empty_audio", path)  # what soundfile writes for a FLAC without samples
    try:
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, OSError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise BadRow("unreadable_audio", str(err)) from None  # names the file
    if samples.shape[0] == 0:
        raise BadRow("empty_audio", path)
    mono = torch.from_numpy(samples.mean(axis=1))
    features = log_mel(mono, rate, audio.sample_rate, audio.mel_bins, audio.window_ms, audio.hop_ms)
    return features.numpy()
