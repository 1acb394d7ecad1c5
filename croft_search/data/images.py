"""Read any image file as 8-bit RGB, or fail with one line naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from croft_search.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)

# Modes whose transparency must be flattened: CLIP sees RGB, and transparent pixels of
# web images (logos, clip-art) usually hide arbitrary colours, so we put them on white.
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_image(path: Path) -> Image.Image:
    """`path` as an RGB image. Grayscale, palette, CMYK, alpha and 16-bit images are
    converted (alpha composited on white); a missing or unreadable file is a DataError.
    EXIF orientation is not applied, matching the CoOp/Dassl loaders the reference
    results come from."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            # Decoding everything here (not lazily) surfaces truncated files now, with
            # the path at hand, rather than later inside a transform.
            image.load()
            return _to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale to 8 bits. PIL's own convert clips these at 255
    instead of rescaling, which turns most 16-bit images white."""
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        scale = 255.0
    elif peak > 255.0:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
