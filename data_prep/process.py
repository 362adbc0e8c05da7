"""Per-sample processing: validate by decoding, normalise the image, clean captions. Pure functions, picklable.

Every rejection returns a reason from ``SKIP_REASONS``; nothing raises for bad data.
"""
from __future__ import annotations

import hashlib
import html
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps

SKIP_REASONS = ("zero_byte", "truncated", "not_an_image", "decompression_bomb", "missing_file", "missing_caption",
                "empty_caption", "too_small", "bad_aspect", "duplicate", "unsafe_path", "outside_input", "unreadable")

# Pillow's own bomb limit is ~89.5 Mpx (warning) / 179 Mpx (error); we refuse above this many pixels outright.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass
class Options:
    """Processing options (all also exposed on the command line)."""

    max_side: int | None = None  # resize so that the longer side is at most this (None: keep)
    format: str = "jpg"  # "jpg" | "webp" | "keep" (keep: original bytes when no resize/convert was needed)
    quality: int = 90  # JPEG/WebP quality
    max_bytes: int | None = None  # size budget per image: quality is lowered in steps of 10 until it fits
    min_side: int = 32  # shorter side must be at least this
    max_aspect: float = 5.0  # long/short side ratio at most this
    min_caption_chars: int = 1
    max_caption_chars: int = 1000  # longer captions are cut at a word boundary
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class RawSample:
    """One input sample before processing. ``data`` is None when the source file was missing."""

    key: str
    source: str  # where it came from (path, row, shard/key), for the json and for error examples
    data: bytes | None
    captions: list = field(default_factory=list)  # raw captions (str or bytes)
    extra: dict = field(default_factory=dict)  # source metadata kept in the json (e.g. img2dataset's url)
    reason: str | None = None  # set by a reader that already refuses the sample (e.g. "outside_input")
    detail: str = ""


@dataclass
class Result:
    key: str
    source: str
    reason: str | None = None  # None: accepted
    detail: str = ""
    image: bytes | None = None
    ext: str = ""
    captions: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    digest: str = ""


_CONTROL = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200f\u2028-\u202e\ufeff]")
_SPACE = re.compile(r"\s+")


def clean_caption(raw, opts: Options) -> str:
    """Decodes (invalid UTF-8 bytes dropped), unescapes HTML entities, removes control characters, folds white
    space, normalises to NFC and cuts at ``max_caption_chars`` on a word boundary. Returns "" when unusable."""
    text = raw.decode("utf-8", errors="ignore") if isinstance(raw, (bytes, bytearray)) else str(raw)
    text = html.unescape(html.unescape(text))  # doubly escaped entities (&amp;amp;) are common in crawls
    text = _CONTROL.sub(" ", unicodedata.normalize("NFC", text).replace("\ufffd", ""))
    text = _SPACE.sub(" ", text).strip()
    if len(text) > opts.max_caption_chars:
        text = text[: opts.max_caption_chars].rsplit(" ", 1)[0].strip()
    return text if len(text) >= opts.min_caption_chars else ""


def safe_key(key: str) -> bool:
    """Keys become tar member names: no '..', no absolute paths, no separators or dots that webdataset splits on, no
    control characters (a newline would break every line-based listing of the shard)."""
    return (bool(key) and ".." not in key and not key.startswith(("/", "\\"))
            and not re.search(r"[/\\.\x00-\x1f\x7f]", key))


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation, then CMYK/palette/grey/alpha/16-bit -> 8-bit RGB (alpha composited on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the used range to 8 bits (a plain convert("L") would clip at 255)
        lo, hi = image.getextrema()
        scale = 255.0 / max(1, hi - lo)
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def encode(image: Image.Image, opts: Options) -> tuple[bytes, str]:
    fmt, ext = ("WEBP", "webp") if opts.format == "webp" else ("JPEG", "jpg")
    quality = opts.quality
    while True:
        buf = io.BytesIO()
        image.save(buf, format=fmt, quality=quality)
        data = buf.getvalue()
        if opts.max_bytes is None or len(data) <= opts.max_bytes or quality <= 30:
            return data, ext
        quality -= 10


def decode(data: bytes, opts: Options) -> tuple[Image.Image | None, str | None, str]:
    """Returns (image, None, "") or (None, reason, detail)."""
    if len(data) == 0:
        return None, "zero_byte", ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.size[0] * image.size[1] > opts.max_pixels:
                return None, "decompression_bomb", f"{image.size[0]}x{image.size[1]}"
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exn:
        return None, "decompression_bomb", str(exn)[:80]
    except Image.UnidentifiedImageError:
        return None, "not_an_image", ""
    except (OSError, SyntaxError, ValueError, EOFError) as exn:  # truncated streams raise OSError/SyntaxError
        return None, "truncated", str(exn)[:80]
    return image, None, ""


def process(raw: RawSample, opts: Options) -> Result:
    """Validates and normalises one sample; never raises for bad data."""
    res = Result(raw.key, raw.source)
    if raw.reason:
        res.reason, res.detail = raw.reason, raw.detail
        return res
    if not safe_key(raw.key):
        res.reason, res.detail = "unsafe_path", raw.key
        return res
    if raw.data is None:
        res.reason = "missing_file"
        return res
    if not raw.captions:  # no caption at all (e.g. an image without its sidecar .txt), not an empty one
        res.reason = "missing_caption"
        return res
    captions = [c for c in (clean_caption(c, opts) for c in raw.captions) if c]
    if not captions:
        res.reason = "empty_caption"
        return res
    image, reason, detail = decode(raw.data, opts)
    if reason:
        res.reason, res.detail = reason, detail
        return res
    original_size, original_format = image.size, image.format
    try:
        rgb = to_rgb(image)
    except Exception as exn:  # e.g. a broken EXIF block or an exotic mode
        res.reason, res.detail = "unreadable", str(exn)[:80]
        return res
    width, height = rgb.size
    if min(width, height) < opts.min_side:
        res.reason, res.detail = "too_small", f"{width}x{height}"
        return res
    if max(width, height) / min(width, height) > opts.max_aspect:
        res.reason, res.detail = "bad_aspect", f"{width}x{height}"
        return res
    if opts.max_side and max(width, height) > opts.max_side:
        scale = opts.max_side / max(width, height)
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    untouched = rgb is image and original_format in ("JPEG", "WEBP")
    if opts.format == "keep" and untouched:
        res.image, res.ext = raw.data, "jpg" if original_format == "JPEG" else "webp"
    else:
        res.image, res.ext = encode(rgb, opts if opts.format != "keep" else Options(quality=opts.quality))
    res.captions = captions
    res.digest = hashlib.sha256(raw.data).hexdigest()
    res.meta = {"source": raw.source, "original_size": [original_size[0], original_size[1]],
                "original_format": original_format, "size": list(rgb.size), **raw.extra}
    return res
