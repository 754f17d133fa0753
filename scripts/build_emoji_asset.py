#!/usr/bin/env python
"""Build the embedded emoji asset shipped in ``src/mammut/data/assets``.

Renders every single-codepoint emoji of the Noto Color Emoji font, gives each a
caption-friendly name derived from ``unicodedata.name`` and stores the sprites
as one compressed ``emoji.npz`` (plus ``NOTICE-emoji.txt`` with the font's
licence).  Only needed to *rebuild* the asset; tests and demos never run it.

The font comes from Debian/Ubuntu (``apt-get install fonts-noto-color-emoji``).

Usage::

    python scripts/build_emoji_asset.py [--font PATH] [--size 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import re
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("build_emoji_asset")

DEFAULT_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
DEFAULT_COPYRIGHT = "/usr/share/doc/fonts-noto-color-emoji/copyright"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "mammut" / "data" / "assets"

# Noto Color Emoji is a bitmap (CBDT) font whose only strike is 109 px.
FONT_SIZE = 109
CANVAS = 192
OFFSET = 28

# Unicode blocks that hold emoji (Python's unicodedata has no block lookup).
BLOCKS: list[tuple[int, int, str]] = [
    (0x0000, 0x00FF, "Latin-1"),
    (0x2000, 0x206F, "General Punctuation"),
    (0x2100, 0x214F, "Letterlike Symbols"),
    (0x2190, 0x21FF, "Arrows"),
    (0x2300, 0x23FF, "Miscellaneous Technical"),
    (0x2460, 0x24FF, "Enclosed Alphanumerics"),
    (0x25A0, 0x25FF, "Geometric Shapes"),
    (0x2600, 0x26FF, "Miscellaneous Symbols"),
    (0x2700, 0x27BF, "Dingbats"),
    (0x2900, 0x297F, "Supplemental Arrows-B"),
    (0x2B00, 0x2BFF, "Miscellaneous Symbols and Arrows"),
    (0x3000, 0x303F, "CJK Symbols and Punctuation"),
    (0x3200, 0x32FF, "Enclosed CJK Letters and Months"),
    (0x1F000, 0x1F02F, "Mahjong Tiles"),
    (0x1F0A0, 0x1F0FF, "Playing Cards"),
    (0x1F100, 0x1F1FF, "Enclosed Alphanumeric Supplement"),
    (0x1F200, 0x1F2FF, "Enclosed Ideographic Supplement"),
    (0x1F300, 0x1F5FF, "Miscellaneous Symbols and Pictographs"),
    (0x1F600, 0x1F64F, "Emoticons"),
    (0x1F680, 0x1F6FF, "Transport and Map Symbols"),
    (0x1F780, 0x1F7FF, "Geometric Shapes Extended"),
    (0x1F900, 0x1F9FF, "Supplemental Symbols and Pictographs"),
    (0x1FA70, 0x1FAFF, "Symbols and Pictographs Extended-A"),
]

# Words that would make a spatial caption ambiguous ("a left right arrow left of ...").
RELATION_WORDS = {"left", "right", "above", "below", "leftwards", "rightwards"}
NAME_RE = re.compile(r"^[a-z]+(?:[ -][a-z]+)*$")
MAX_WORDS = 5


def block_of(cp: int) -> str:
    """Return the Unicode block name for ``cp`` (or ``"Other"``)."""
    for lo, hi, name in BLOCKS:
        if lo <= cp <= hi:
            return name
    return "Other"


def font_codepoints(font_path: str) -> list[int]:
    """Codepoints mapped by the font's cmap (fontTools), or a brute-force range."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:  # pragma: no cover - fontTools is optional
        log.warning("fontTools not available; scanning codepoint ranges instead")
        return [cp for lo, hi, _ in BLOCKS for cp in range(lo, hi + 1)]
    return sorted(TTFont(font_path).getBestCmap())


def caption_name(cp: int) -> str | None:
    """Caption-friendly lower-case name for ``cp``, or ``None`` to drop the emoji."""
    ch = chr(cp)
    if unicodedata.category(ch) != "So":
        return None
    name = unicodedata.name(ch, "").lower()
    if not name or name.startswith("regional indicator"):
        return None
    if name.endswith(" sign"):
        name = name[: -len(" sign")]
    if not NAME_RE.match(name):
        return None
    words = re.split(r"[ -]", name)
    if len(words) > MAX_WORDS or RELATION_WORDS.intersection(words):
        return None
    return name


def render(font: ImageFont.FreeTypeFont, cp: int, size: int) -> np.ndarray | None:
    """Render ``cp`` as an RGBA (size, size, 4) uint8 sprite, or ``None`` if empty."""
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((OFFSET, OFFSET), chr(cp), font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # Pillow resamples RGBA in premultiplied space, so edges do not darken.
    sprite = np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
    if int(sprite[..., 3].max()) < 32:
        return None
    sprite = sprite.copy()
    sprite[sprite[..., 3] == 0, :3] = 0  # invisible colour only costs bytes
    return sprite


def licence_text(copyright_path: str, font: ImageFont.FreeTypeFont) -> str:
    """NOTICE text: attribution plus the SIL OFL 1.1 text from the Debian copyright file."""
    lines = Path(copyright_path).read_text(encoding="utf-8").splitlines()
    # The stanza holding the full text: a "License: SIL..." line followed by indented lines.
    start = next(
        i
        for i, line in enumerate(lines[:-1])
        if line.startswith("License:") and "SIL" in line and lines[i + 1].startswith(" ")
    )
    body = []
    for line in lines[start + 1 :]:
        if line and not line.startswith(" "):
            break
        body.append("" if line.strip() == "." else line[1:])
    family, style = font.getname()
    header = [
        "Emoji images in emoji.npz",
        "=========================",
        "",
        f"The sprites in emoji.npz were rendered from the {family} ({style}) font,",
        "part of the Noto Emoji project: https://github.com/googlefonts/noto-emoji",
        "Copyright 2013-2017 Google Inc. (and Arjen Nienhuis).",
        "",
        "They were rendered, cropped and downsampled by scripts/build_emoji_asset.py",
        "(a derivative of the font's glyph images), and are distributed under the",
        "SIL Open Font License, Version 1.1, reproduced below.  The emoji names come",
        "from the Unicode Character Database (Python's unicodedata module).",
        "",
    ]
    return "\n".join(header + body).rstrip() + "\n"


def build(font_path: str, copyright_path: str, size: int, out_dir: Path) -> Path:
    """Render all emoji and write ``emoji.npz`` and ``NOTICE-emoji.txt`` into ``out_dir``."""
    font = ImageFont.truetype(font_path, FONT_SIZE)
    sprites, names, cps, cats, blocks = [], [], [], [], []
    seen: set[str] = set()
    dropped = 0
    for cp in font_codepoints(font_path):
        name = caption_name(cp)
        if name is None or name in seen:
            dropped += 1
            continue
        sprite = render(font, cp, size)
        if sprite is None:
            dropped += 1
            continue
        seen.add(name)
        sprites.append(sprite)
        names.append(name)
        cps.append(cp)
        cats.append(unicodedata.category(chr(cp)))
        blocks.append(block_of(cp))
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = out_dir / "emoji.npz"
    np.savez_compressed(
        npz,
        images=np.stack(sprites).astype(np.uint8),
        names=np.array(names),
        codepoints=np.array(cps, dtype=np.int64),
        categories=np.array(cats),
        blocks=np.array(blocks),
        font=np.array(Path(font_path).name),
    )
    (out_dir / "NOTICE-emoji.txt").write_text(licence_text(copyright_path, font), encoding="utf-8")
    log.info("wrote %d emoji (%d codepoints dropped) to %s (%.2f MB)",
             len(names), dropped, npz, npz.stat().st_size / 1e6)
    return npz


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=DEFAULT_FONT)
    parser.add_argument("--copyright", default=DEFAULT_COPYRIGHT)
    parser.add_argument("--size", type=int, default=32, help="sprite side in pixels")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(args.font).is_file():
        raise SystemExit(f"font not found: {args.font} (apt-get install fonts-noto-color-emoji)")
    build(args.font, args.copyright, args.size, args.out)


if __name__ == "__main__":
    main()
