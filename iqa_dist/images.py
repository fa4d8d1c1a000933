"""Opening image files the way IQA needs: 8-bit RGB, original pixels, clear errors; and pack's
resize policies, which evaluation and predict apply to unpacked images too."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ConfigError

# PIL's own bomb check warns at 89 megapixels and fails at twice that, naming no file;
# ours (max_pixels) refuses before decoding, with the file's name, at a limit users set.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 64_000_000  # SPAQ's 4000x3000 photos are 12 megapixels
# An image smaller than a patch is upsampled only up to this ratio of its sides: photographs
# (even panoramas) stay well within it; past it the "image" is a strip, and its upsampled
# copy would be mostly invented pixels
MAX_UPSAMPLED_ASPECT = 20

# How every image is read, in pack, training and predict alike (the card records it).
DECODING = "8-bit RGB; EXIF orientation applied; 16-bit samples scaled by bit depth; alpha over white"

# Modes PIL decodes to 8-bit RGB without changing what a viewer sees.
_DIRECT = {"RGB"}


class BadImage(ValueError):
    """An image that cannot be used; the message says why in a few words."""


def max_pixels() -> int:
    """The decompression-bomb limit: ``IQA_MAX_PIXELS`` or 64 megapixels. A small PNG can
    declare 20000x20000 pixels, gigabytes once decoded."""
    text = os.environ.get("IQA_MAX_PIXELS", "")
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(float(text))
    except (ValueError, OverflowError):
        limit = 0
    if limit < 1:
        raise ConfigError(f"IQA_MAX_PIXELS={text!r}: expected a positive number of pixels")
    return limit


def open_rgb(data: bytes, where: str = "image") -> tuple[Image.Image, str | None]:
    """Decode ``data`` fully; return an RGB image and what was converted (None: nothing).

    Truncated files fail here rather than later in a training worker; images over
    ``max_pixels`` fail before they are decoded.
    """
    limit = max_pixels()
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        _check_size(img, limit, where)
        img.load()
        # a phone's portrait photo is stored sideways with an orientation tag: a viewer,
        # and so a rater, sees it upright
        ImageOps.exif_transpose(img, in_place=True)
    except BadImage:
        raise
    except UnidentifiedImageError:  # PIL's message names an anonymous buffer, not the file
        raise BadImage(f"{where}: unreadable image (not an image format PIL knows)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{where}: unreadable image ({err})") from None
    if img.mode in _DIRECT:
        return img, None
    return to_rgb8(img), img.mode


def check_upsampling(w: int, h: int, p: int, where: str) -> None:
    """Refuse a ``w`` x ``h`` image whose short side is below the patch side ``p`` when
    upsampling it to ``p`` would be absurd: a 1x60000 strip (0.06 megapixels) becomes
    224 x 13.4 million pixels, gigabytes. Its long side may be at most MAX_UPSAMPLED_ASPECT
    times its short side, and the upsampled image is held to ``max_pixels`` like a decoded one."""
    short, long = min(w, h), max(w, h)
    if short >= p:
        return
    if long > MAX_UPSAMPLED_ASPECT * short:
        raise BadImage(f"{where}: {w}x{h} is too thin to upsample to a {p}-pixel patch (its sides are "
                       f"over {MAX_UPSAMPLED_ASPECT}:1)")
    limit, side = max_pixels(), round(long * p / short)
    if side * p > limit:
        raise BadImage(f"{where}: {w}x{h} upsampled to a {p}-pixel patch is {side * p / 1e6:.3g} megapixels, "
                       f"over the limit of {limit / 1e6:.3g} (IQA_MAX_PIXELS)")


def _check_size(img: Image.Image, limit: int, where: str) -> None:
    if img.width * img.height > limit:
        raise BadImage(f"{where}: {img.width}x{img.height} is {img.width * img.height / 1e6:.3g} megapixels, "
                       f"over the limit of {limit / 1e6:.3g} (a decompression bomb? raise IQA_MAX_PIXELS "
                       "if it is a real photograph)")


def to_rgb8(img: Image.Image) -> Image.Image:
    """16-bit, grey, palette, CMYK and alpha images to 8-bit RGB (alpha over white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 2.0 ** _bit_depth(img) - 1  # not the maximum: a dark 16-bit image stays dark
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _bit_depth(img: Image.Image) -> int:
    """Bits per sample of an integer image: a TIFF says it; PIL opens 16-bit PNG and PGM
    files as ``I;16`` (older versions as ``I``), so 16 otherwise."""
    bits = getattr(img, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0]
    return int(bits) if bits else 16


def read_rgb(path: str | Path) -> Image.Image:
    """Open a file as 8-bit RGB, or raise BadImage naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise BadImage(f"{path}: cannot read ({err.strerror})") from None
    return open_rgb(data, str(path))[0]


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless; level 1 is 5x faster than 6
    return buf.getvalue()


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


# ---------------------------------------------------------------- pack's resize policies

# (width, height) of the policies that fix an image's size: seed's for every image, koniq's
# for a landscape one (a portrait one is turned: height x width)
SEED_SIZE = (384, 512)
KONIQ_SIZE = (512, 384)


def check_resize(policy: str) -> str:
    """``policy`` when it is one of pack's resize policies, else a ValueError saying so."""
    short = policy.removeprefix("short:")
    if policy in ("none", "seed", "koniq") or (short != policy and short.isdigit() and int(short) > 0):
        return policy
    raise ValueError(f"resize {policy!r}: not one of none, seed, koniq, short:N (N pixels)")


def resize_policy(img: Image.Image, policy: str) -> Image.Image | None:
    """The resized image, or None when the policy leaves it alone.

    ``seed``: the seed's ``torchvision.transforms.Resize((512, 384))``, which on a PIL
    image is PIL's antialiased bilinear resize to 384 wide x 512 tall (height first:
    landscape photos are squashed), for every image. ``koniq``: 512x384 keeping the
    orientation, bicubic. ``short:N``: the short side down to N, bicubic.
    """
    if check_resize(policy) == "none":
        return None
    if policy == "seed":
        return None if img.size == SEED_SIZE else img.resize(SEED_SIZE, Image.Resampling.BILINEAR)
    if policy == "koniq":
        size = KONIQ_SIZE if img.width >= img.height else KONIQ_SIZE[::-1]
    else:  # short:N
        scale = int(policy.removeprefix("short:")) / min(img.size)
        if scale >= 1:
            return None
        size = (round(img.width * scale), round(img.height * scale))
    if img.size == size:  # e.g. KonIQ's own 512x384 copies: keep their original bytes
        return None
    return img.resize(size, Image.Resampling.BICUBIC)
