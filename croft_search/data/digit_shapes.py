"""Digit shapes for the embedded benchmark: stroke masks drawn from scikit-learn's bundled
handwritten digits or from fonts bundled with matplotlib, with random geometric jitter.

The reserved split (decided once, independent of any build seed):
- scikit-learn's 1797 handwritten samples are split per digit into two halves by a
  permutation seeded with RESERVED_SPLIT_SEED; the first half feeds the benchmark, the
  second half feeds the tiny CLIP's pre-training corpus. Fixing this seed (rather than
  deriving it from the build seed) keeps the shipped checkpoint's pre-training data
  disjoint from a benchmark built with any seed.
- The font files are split the same way, by file: every family (DejaVu Sans, Sans Mono,
  Serif, STIX General, Computer Modern) contributes some weights/slants to each side and
  no file to both.
- Jitter is drawn from separate random streams for the two purposes (see digits.py).
So no benchmark image is ever reproduced in pre-training: their shapes differ at source.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from croft_search.errors import DataError

# scipy.ndimage is imported where a digit is drawn: the dataset registry imports this
# module wherever a space is read, in every search worker too, and those never draw one.

SHAPE_SIZE = 64  # the canvas the styles paint on; images are downsampled afterwards
RESERVED_SPLIT_SEED = 20_240_517
HANDWRITTEN_SHARE = 0.5

Purpose = Literal["benchmark", "pretrain"]

BENCHMARK_FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
)
PRETRAIN_FONT_FILES = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmb10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)


@dataclass(frozen=True)
class ShapePool:
    """The sources one purpose draws digit shapes from."""

    purpose: Purpose
    handwritten: Mapping[int, np.ndarray]  # digit -> (n, 8, 8) images, values in [0, 1]
    handwritten_indices: Mapping[int, tuple[int, ...]]  # digit -> indices into load_digits()
    fonts: tuple[Path, ...]


@functools.lru_cache(maxsize=2)
def shape_pool(purpose: Purpose) -> ShapePool:
    """The benchmark's or the pre-training corpus's share of the shape sources."""
    images, targets = _handwritten_digits()
    take_first_half = purpose == "benchmark"
    handwritten: dict[int, np.ndarray] = {}
    indices: dict[int, tuple[int, ...]] = {}
    for digit in range(10):
        of_digit = np.flatnonzero(targets == digit)
        shuffled = np.random.default_rng([RESERVED_SPLIT_SEED, digit]).permutation(of_digit)
        half = len(shuffled) // 2
        chosen = np.sort(shuffled[:half] if take_first_half else shuffled[half:])
        handwritten[digit] = images[chosen]
        indices[digit] = tuple(int(index) for index in chosen)
    names = BENCHMARK_FONT_FILES if take_first_half else PRETRAIN_FONT_FILES
    return ShapePool(purpose, handwritten, indices, _available_fonts(names))


def font_names(pool: ShapePool) -> list[str]:
    return [font.name for font in pool.fonts]


def digit_mask(digit: int, pool: ShapePool, rng: np.random.Generator) -> np.ndarray:
    """A (SHAPE_SIZE, SHAPE_SIZE) float32 stroke coverage in [0, 1] of `digit`: a
    handwritten sample or a font glyph (about half each), randomly placed and deformed."""
    if rng.random() < HANDWRITTEN_SHARE:
        samples = pool.handwritten[digit]
        shape = _handwritten_shape(samples[rng.integers(len(samples))], rng)
        rotation = 12.0
    else:
        font = pool.fonts[rng.integers(len(pool.fonts))]
        shape = _glyph_shape(digit, font, rng)
        rotation = 15.0
    jittered = _affine_jitter(shape, rng, max_rotation_deg=rotation, max_shear=0.25, shift=5)
    return np.asarray(jittered, dtype=np.float32) / 255.0


def _handwritten_shape(sample: np.ndarray, rng: np.random.Generator) -> Image.Image:
    from scipy import ndimage

    size = int(rng.integers(36, 48))
    upsampled = Image.fromarray(np.uint8(sample * 255.0)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    smooth = ndimage.gaussian_filter(np.asarray(upsampled, np.float32) / 255.0, size / 20.0)
    # sklearn's digits are 8x8 block averages; a soft threshold turns the blur back into
    # a pen stroke, and its level sets the stroke width.
    level = rng.uniform(0.28, 0.5)
    stroke = np.clip((smooth - level) / 0.12 + 0.5, 0.0, 1.0)
    canvas = Image.new("L", (SHAPE_SIZE, SHAPE_SIZE))
    offset = (SHAPE_SIZE - size) // 2
    canvas.paste(Image.fromarray(np.uint8(stroke * 255.0)), (offset, offset))
    return canvas


def _glyph_shape(digit: int, font_path: Path, rng: np.random.Generator) -> Image.Image:
    font = _font(str(font_path), int(rng.integers(34, 50)))
    stroke_width = int(rng.integers(0, 3))
    canvas = Image.new("L", (SHAPE_SIZE, SHAPE_SIZE))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox(
        (0, 0), str(digit), font=font, stroke_width=stroke_width
    )
    origin = ((SHAPE_SIZE - (right - left)) / 2 - left, (SHAPE_SIZE - (bottom - top)) / 2 - top)
    draw.text(origin, str(digit), font=font, fill=255, stroke_width=stroke_width, stroke_fill=255)
    return canvas


def _affine_jitter(
    shape: Image.Image,
    rng: np.random.Generator,
    max_rotation_deg: float,
    max_shear: float,
    shift: int,
) -> Image.Image:
    angle = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
    shear = rng.uniform(-max_shear, max_shear)
    scale = rng.uniform(0.85, 1.1)
    shift_x, shift_y = rng.uniform(-shift, shift, size=2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    forward = scale * rotation @ np.array([[1.0, shear], [0.0, 1.0]])
    # PIL maps every output pixel back to an input pixel, so it needs the inverse map,
    # taken about the canvas centre (moved by the shift).
    (a, b), (d, e) = np.linalg.inv(forward)
    centre = SHAPE_SIZE / 2
    moved_x, moved_y = centre + shift_x, centre + shift_y
    c = centre - a * moved_x - b * moved_y
    f = centre - d * moved_x - e * moved_y
    return shape.transform(
        shape.size, Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BILINEAR
    )


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=1)
def _handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn is slow to import and only the builder needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float32) / 16.0, np.asarray(bunch.target)


def _available_fonts(names: tuple[str, ...]) -> tuple[Path, ...]:
    import matplotlib

    font_dir = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    found = tuple(font_dir / name for name in names if (font_dir / name).is_file())
    if not found:
        raise DataError(
            f"no usable digit fonts in {font_dir}; the digits benchmark needs matplotlib's "
            f"bundled fonts (reinstall matplotlib)"
        )
    return found
