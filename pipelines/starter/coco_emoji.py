"""Emoji captioning as COCO captions: ``fonts-noto-color-emoji`` drawn by Pillow, named by the
PyPI ``emoji`` package, as a captions json per split and 64x64 PNGs.

The splits are cut by rendering *variant*, not by emoji: every emoji appears in train (variant 0
is the plain centred rendering), and dev/test hold other renderings (shifted, scaled, on a
tinted background). Splitting by emoji would make captioning unlearnable at this scale.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pipelines.starter.common import SPLITS, Size, progress

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_RENDER_SIZE = 109  # the only size at which Noto Color Emoji's bitmaps render
EMOJI_IMAGE_SIZE = 64
# Faces, animals, plants, food and sky first: simple, familiar pictures with plain names.
SIMPLE_EMOJI_BLOCKS = (
    (0x1F600, 0x1F64F),
    (0x1F910, 0x1F92F),
    (0x1F970, 0x1F97F),
    (0x1FAE0, 0x1FAEF),
    (0x1F400, 0x1F43F),
    (0x1F980, 0x1F9AE),
    (0x1F330, 0x1F344),
    (0x1F345, 0x1F37F),
    (0x1F950, 0x1F96F),
    (0x1F300, 0x1F320),
)


def emoji_caption(name: str) -> str:
    """':grinning_face:' -> 'grinning face'."""
    return " ".join(name.strip(":").replace("_", " ").split())


def emoji_captions(data: dict) -> list[str]:
    """The CLDR name, then the aliases, except numbered ones such as GitHub's ':mouse2:'."""
    name = emoji_caption(data["en"])
    aliases = [emoji_caption(alias) for alias in data.get("alias", [])]
    aliases = [alias for alias in aliases if not re.search(r"\d", alias) or re.search(r"\d", name)]
    return list(dict.fromkeys([name, *aliases]))


def emoji_order(char: str) -> tuple:
    """Single-codepoint emoji of the simple blocks first, then the rest by codepoint."""
    codepoints = [ord(c) for c in char if c != "\ufe0f"]
    block = next(
        (
            i
            for i, (lo, hi) in enumerate(SIMPLE_EMOJI_BLOCKS)
            if len(codepoints) == 1 and lo <= codepoints[0] <= hi
        ),
        len(SIMPLE_EMOJI_BLOCKS),
    )
    return (block, len(codepoints), codepoints)


def render_glyph(char: str, font):
    """The emoji as an RGBA image cropped to its ink, or None when the font cannot draw it alone."""
    from PIL import Image, ImageDraw

    _, _, right, bottom = font.getbbox(char)
    if font.getlength(char) > 1.5 * EMOJI_RENDER_SIZE:  # drawn as several glyphs side by side
        return None
    canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    ink = canvas.getbbox()
    return canvas.crop(ink) if ink else None  # no ink: the font has no glyph for it


def render_variant(glyph, rng: random.Random, plain: bool):
    """A 64x64 RGB picture of the glyph; plain = centred on white, else shifted/scaled/tinted."""
    from PIL import Image

    side = EMOJI_IMAGE_SIZE
    background = (255, 255, 255) if plain else tuple(255 - rng.randrange(48) for _ in range(3))
    scale = 0.8 if plain else rng.uniform(0.55, 0.95)
    width = max(1, round(side * scale))
    height = max(1, round(width * glyph.height / glyph.width))
    small = glyph.resize((width, height), Image.LANCZOS)
    x_room, y_room = side - width, side - height
    x = x_room // 2 if plain else rng.randint(0, max(0, x_room))
    y = y_room // 2 if plain else rng.randint(0, max(0, y_room))
    picture = Image.new("RGB", (side, side), background)
    picture.paste(small, (x, y), small)
    return picture


def choose_emoji(count: int | None) -> list[tuple[str, object]]:
    """(emoji, glyph) for the first `count` emoji in :func:`emoji_order` that the font draws."""
    import emoji
    from PIL import ImageFont

    font = ImageFont.truetype(str(EMOJI_FONT), EMOJI_RENDER_SIZE)
    fully_qualified = emoji.STATUS["fully_qualified"]
    candidates = [c for c, data in emoji.EMOJI_DATA.items() if data["status"] == fully_qualified]
    chosen = []
    for char in sorted(candidates, key=emoji_order):
        if count is not None and len(chosen) == count:
            break
        glyph = render_glyph(char, font)
        if glyph is not None:
            chosen.append((char, glyph))
    return chosen


def write_coco_split(dst: Path, split: str, chosen, variants: range, seed: int) -> int:
    """Render the variants of every chosen emoji and write captions_<split>.json."""
    import emoji

    side = EMOJI_IMAGE_SIZE
    images, annotations = [], []
    (dst / split).mkdir(parents=True)
    for char, glyph in progress(chosen, f"coco_emoji {split}"):
        codepoints = "-".join(f"{ord(c):x}" for c in char if c != "\ufe0f")
        for variant in variants:
            rng = random.Random(f"{seed}:coco_emoji:{codepoints}:{variant}")
            file_name = f"u{codepoints}_v{variant}.png"
            render_variant(glyph, rng, plain=variant == 0).save(dst / split / file_name)
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "height": side, "width": side})
            for caption in emoji_captions(emoji.EMOJI_DATA[char]):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    coco = {
        "info": {"description": f"Noto Color Emoji renderings, {split} split", "version": "1.0"},
        "images": images,
        "annotations": annotations,
    }
    (dst / "annotations").mkdir(exist_ok=True)
    text = json.dumps(coco, ensure_ascii=False, indent=1) + "\n"
    (dst / "annotations" / f"captions_{split}.json").write_text(text, encoding="utf-8")
    return len(images)


def build_coco_emoji(dst: Path, size: Size, seed: int) -> dict[str, int]:
    chosen = choose_emoji(size.emoji)
    # Variant numbers run on across splits: train gets 0 (the plain rendering) and the next few.
    n = size.emoji_variants
    variants = {
        "train": range(0, n.train),
        "dev": range(n.train, n.train + n.dev),
        "test": range(n.train + n.dev, n.train + n.dev + n.test),
    }
    return {split: write_coco_split(dst, split, chosen, variants[split], seed) for split in SPLITS}
