"""The four visual domains of the embedded digits benchmark, each a function that paints a
digit's stroke mask into an RGB image. The domains differ in background, digit rendering
and texture so a classifier trained on three of them meets a real covariate shift on the
fourth; painting (textured, low-contrast, occluded) is made the hardest on purpose."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from croft_search.data.digit_shapes import SHAPE_SIZE

# scipy.ndimage is imported where a digit is drawn: the dataset registry imports this
# module wherever a space is read, in every search worker too, and those never draw one.

IMAGE_SIZE = 32
# Pixel coordinates of the canvas, shared by the styles that need them. Everything is
# float32: half the memory traffic of float64, and the eye cannot tell the difference.
_ROWS, _COLUMNS = np.mgrid[0:SHAPE_SIZE, 0:SHAPE_SIZE].astype(np.float32)

Style = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def render_style(domain: str, mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """`mask` painted in the style of `domain`, as an IMAGE_SIZE x IMAGE_SIZE RGB image."""
    painted = STYLES[domain](mask, rng)
    pixels = np.uint8(np.clip(painted, 0.0, 1.0) * 255.0 + 0.5)
    return Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def photo(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shaded, embossed digit casting a soft shadow on a smooth colour gradient, slightly
    out of focus, with sensor noise."""
    from scipy import ndimage

    hue = rng.random()
    start = _hsv(hue, rng.uniform(0.1, 0.5), rng.uniform(0.45, 0.95))
    end = _hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.9))
    background = _gradient(start, end, rng.uniform(0.0, 2.0 * np.pi))
    ink = _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.1, 1.0))
    ink = _contrasting(ink, _luminance(background.mean(axis=(0, 1))), 0.35, rng)
    light = rng.uniform(0.0, 2.0 * np.pi)
    height = ndimage.gaussian_filter(mask, 2.0)
    slope_y, slope_x = np.gradient(height)
    shading = -(slope_x * math.cos(light) + slope_y * math.sin(light)) * 8.0
    shadow_offset = (3.0 * math.sin(light + np.pi), 3.0 * math.cos(light + np.pi))
    shadow = ndimage.shift(ndimage.gaussian_filter(mask, 2.5), shadow_offset, order=1)
    image = background * (1.0 - 0.5 * shadow[..., None])
    digit = ink * (0.85 + shading[..., None]) + 0.3 * np.clip(shading, 0.0, None)[..., None]
    image = _over(image, digit, mask)
    image = _blur(image, rng.uniform(0.6, 1.2))
    return image + 0.015 * rng.standard_normal(image.shape, dtype=np.float32)


def sketch(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thin, broken graphite outlines (sometimes doubled, sometimes hatched inside) on
    grainy off-white paper."""
    from scipy import ndimage

    paper_tone = rng.uniform(0.88, 1.0)
    grain_noise = 0.03 * rng.standard_normal((SHAPE_SIZE, SHAPE_SIZE), dtype=np.float32)
    paper = paper_tone + _blur(grain_noise, 0.6)
    outline = _edges(mask)
    if rng.random() < 0.6:
        # A second, offset pass of the pencil: the sketchy double line.
        offset = rng.uniform(-1.5, 1.5, size=2)
        outline = np.maximum(outline, 0.7 * ndimage.shift(outline, offset, order=1))
    if rng.random() < 0.5:
        outline = np.maximum(outline, 0.5 * _hatching(rng) * ndimage.grey_erosion(mask, 3))
    pressure = 0.45 + 0.55 * _smooth_noise(rng, cells=5, channels=1)[..., 0]
    grain = 0.55 + 0.45 * _uniform_noise(rng, (SHAPE_SIZE, SHAPE_SIZE))
    graphite = np.clip(outline * pressure * grain, 0.0, 1.0) * rng.uniform(0.6, 0.95)
    tint = np.array([1.0, rng.uniform(0.96, 1.0), rng.uniform(0.9, 0.98)], dtype=np.float32)
    return (paper * (1.0 - graphite))[..., None] * tint


def cartoon(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A flat, saturated digit with a thick black outline and a flat drop shadow on a flat
    background of a contrasting hue, sometimes with flat polka dots."""
    from scipy import ndimage

    hue = rng.random()
    background_colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.75, 1.0))
    fill = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    image = np.broadcast_to(background_colour, (SHAPE_SIZE, SHAPE_SIZE, 3)).copy()
    if rng.random() < 0.5:
        dots = _dots(rng, count=int(rng.integers(3, 8)))
        image = _over(image, _hsv(hue, 0.3, 1.0), dots)
    crisp = np.clip((mask - 0.5) * 4.0 + 0.5, 0.0, 1.0)
    outlined = ndimage.grey_dilation(crisp, footprint=_disk(int(rng.integers(2, 4))))
    shadow = ndimage.shift(outlined, rng.uniform(2.0, 4.0, size=2), order=0)
    image = _over(image, background_colour * 0.55, shadow)
    image = _over(image, np.zeros(3, dtype=np.float32), outlined)
    return _over(image, fill, crisp)


def painting(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blotchy low-frequency colour fields with directional brush streaks; the digit is a
    semi-transparent, colour-jittered, ragged stroke of moderate contrast, and stray brush
    strokes cross the canvas."""
    from scipy import ndimage

    palette = np.stack(
        [_hsv(rng.random(), rng.uniform(0.3, 0.85), rng.uniform(0.35, 0.9)) for _ in range(3)]
    )
    weights = _smooth_noise(rng, cells=int(rng.integers(3, 6)), channels=3) ** 3 + 1e-3
    background = (weights / weights.sum(axis=-1, keepdims=True)) @ palette
    streaks = _brush_streaks(rng)
    background = background * (1.0 + 0.25 * streaks[..., None])
    ink = _hsv(rng.random(), rng.uniform(0.4, 0.9), rng.uniform(0.3, 1.0))
    # A smaller luminance gap than photo's: low contrast is part of what makes it hard.
    ink = _contrasting(ink, _luminance(background.mean(axis=(0, 1))), 0.22, rng)
    ink_field = ink + 0.3 * (_smooth_noise(rng, cells=4, channels=3) - 0.5)
    ragged = ndimage.gaussian_filter(mask, 0.9) + 0.25 * streaks
    coverage = np.clip((ragged - 0.4) * 3.0 + 0.5, 0.0, 1.0) * rng.uniform(0.65, 0.9)
    image = _over(background, ink_field, coverage)
    image = _over_premultiplied(image, _stray_strokes(rng, count=int(rng.integers(2, 6))))
    canvas = 1.0 + 0.08 * (_uniform_noise(rng, (SHAPE_SIZE, SHAPE_SIZE, 1)) - 0.5)
    return _blur(image, 0.5) * canvas


STYLES: dict[str, Style] = {
    "photo": photo,
    "sketch": sketch,
    "cartoon": cartoon,
    "painting": painting,
}


def _over(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`colour` (RGB or per-pixel RGB) painted over `image` with per-pixel opacity `alpha`."""
    alpha = alpha[..., None]
    return image * (1.0 - alpha) + colour * alpha


def _over_premultiplied(image: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """A premultiplied RGBA `layer` painted over `image`."""
    return image * (1.0 - layer[..., 3:]) + layer[..., :3]


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(hue % 1.0, saturation, float(np.clip(value, 0, 1)))
    return np.array(rgb, dtype=np.float32)


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape, dtype=np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    spatial = (sigma, sigma, 0.0) if image.ndim == 3 else sigma
    return ndimage.gaussian_filter(image, spatial)


def _gradient(start: np.ndarray, end: np.ndarray, angle: float) -> np.ndarray:
    ys, xs = _ROWS / (SHAPE_SIZE - 1) - 0.5, _COLUMNS / (SHAPE_SIZE - 1) - 0.5
    position = np.clip(xs * math.cos(angle) + ys * math.sin(angle) + 0.5, 0.0, 1.0)[..., None]
    return start * (1.0 - position) + end * position


def _smooth_noise(rng: np.random.Generator, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a cells x cells random grid, smoothly upsampled
    (by PIL on 8 bits: ten times faster than a spline zoom, and smooth enough)."""
    grid = np.uint8(rng.random((cells, cells, channels)) * 255.0)
    layers = [
        Image.fromarray(grid[..., channel]).resize(
            (SHAPE_SIZE, SHAPE_SIZE), Image.Resampling.BICUBIC
        )
        for channel in range(channels)
    ]
    return np.stack([np.asarray(layer) for layer in layers], axis=-1) / np.float32(255.0)


def _luminance(colour: np.ndarray) -> float:
    return float(np.dot(colour, (0.299, 0.587, 0.114)))


def _contrasting(
    colour: np.ndarray, background: float, gap: float, rng: np.random.Generator
) -> np.ndarray:
    """`colour` darkened or lightened (keeping its hue) until its luminance is at least
    `gap` away from the `background` luminance: legible, however the colours fell."""
    darker_possible, lighter_possible = background - gap > 0.05, background + gap < 0.95
    go_darker = darker_possible and (not lighter_possible or rng.random() < 0.5)
    luminance = max(_luminance(colour), 1e-3)
    if go_darker:
        target = min(luminance, background - gap)
        return colour * (target / luminance)
    target = max(luminance, min(background + gap, 0.97))
    headroom = max(1.0 - luminance, 1e-3)
    return 1.0 - (1.0 - colour) * ((1.0 - target) / headroom)


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    slope_y, slope_x = np.gradient(ndimage.gaussian_filter(mask, 0.8))
    magnitude = np.hypot(slope_x, slope_y)
    return np.clip(magnitude / max(float(magnitude.max()), 1e-6) * 1.8, 0.0, 1.0)


def _hatching(rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0.0, np.pi)
    phase = _COLUMNS * math.cos(angle) + _ROWS * math.sin(angle)
    return (np.mod(phase, rng.uniform(3.0, 5.0)) < 1.0).astype(np.float32)


def _brush_streaks(rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-scale noise smeared along one direction, like bristle marks."""
    from scipy import ndimage

    noise = rng.standard_normal((SHAPE_SIZE, SHAPE_SIZE), dtype=np.float32)
    along = rng.uniform(3.0, 7.0)
    sigma = (0.7, along) if rng.random() < 0.5 else (along, 0.7)
    streaks = ndimage.gaussian_filter(noise, sigma)
    return streaks / max(float(np.abs(streaks).max()), 1e-6)


def _disk(radius: int) -> np.ndarray:
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xs**2 + ys**2 <= radius**2


def _dots(rng: np.random.Generator, count: int) -> np.ndarray:
    layer = Image.new("L", (SHAPE_SIZE, SHAPE_SIZE))
    draw = ImageDraw.Draw(layer)
    for x, y, radius in zip(
        rng.uniform(0, SHAPE_SIZE, count),
        rng.uniform(0, SHAPE_SIZE, count),
        rng.uniform(2.0, 6.0, count),
        strict=True,
    ):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    return np.asarray(layer, dtype=np.float32) / 255.0


def _stray_strokes(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` translucent straight brush strokes of random colours, softened, as one
    premultiplied RGBA layer (drawn and blurred together: one filter pass, not `count`)."""
    layer = Image.new("RGBA", (SHAPE_SIZE, SHAPE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer, "RGBA")  # "RGBA" blends overlapping strokes
    for _ in range(count):
        colour = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.95))
        opacity = rng.uniform(0.3, 0.65)
        start = rng.uniform(0, SHAPE_SIZE, size=2)
        end = start + rng.uniform(-40, 40, size=2)
        fill = (*(int(channel * 255) for channel in colour), int(opacity * 255))
        draw.line((*start, *end), fill=fill, width=int(rng.integers(3, 8)))
    rgba = np.asarray(layer, dtype=np.float32) / 255.0
    # Blurring premultiplied colour keeps the transparent black around strokes from
    # bleeding into their edges.
    premultiplied = np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=-1)
    return _blur(premultiplied, 1.0)
