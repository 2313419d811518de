"""Photos as users send them: the one loader the CLI, the Python API, the server and the web
app share.

`load_image` gives an RGB picture (EXIF rotation applied, alpha flattened onto white, 16-bit
scaled to 8) or raises `ImageError` naming the photo and saying what is wrong; nothing else
escapes it, whatever the bytes. Decoding runs under a cost budget judged before a pixel is
decoded: the pixel count from the header (so a decompression bomb costs no memory) and, for a
JPEG, its number of scans, counted from the bytes (a progressive JPEG is decoded once per scan,
so a few hundred kB holding thousands of scans would take minutes to decode); paths that are
not regular files (folders, FIFOs, devices) are refused without reading them, so nothing can
hang on them.
"""
from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

from importlib import resources

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from captioner.errors import ImageError

ImageInput = Union[str, Path, bytes, Image.Image]

# Photos above this many pixels are refused from their header (a 64 MP photo decodes to 192 MB).
MAX_PIXELS = 64_000_000
# JPEGs with more scans than this are refused before decoding. Encoders write 1 to 3 scans for a
# baseline JPEG and about 10 for a progressive one (libjpeg's default script); each scan costs a
# pass over every pixel, so the cap bounds a decode at MAX_PIXELS x MAX_SCANS pixel-passes.
MAX_SCANS = 100


def examples_dir() -> Path:
    """The example photos shipped inside the package (cat, coffee, rocket, astronaut)."""
    return Path(str(resources.files("captioner") / "examples"))


def example_photos() -> list[Path]:
    """The shipped example photos, sorted by name."""
    folder = examples_dir()
    return sorted(folder.glob("*.jpg")) if folder.is_dir() else []


def resolve_photo_path(path: str | Path) -> Path:
    """`path` as given; or, where no such file exists and it names a shipped example as
    `examples/NAME`, that example inside the package (so the README's examples run from any folder)."""
    path = Path(path)
    try:
        exists = path.exists()
    except OSError:  # a name too long for the system: opening it gives the error
        return path
    if not exists and len(path.parts) == 2 and path.parts[0] == "examples":
        shipped = examples_dir() / path.name
        if shipped.is_file():
            return shipped
    return path


@dataclass(frozen=True)
class ImageLimits:
    """What a caller accepts; the server sets these from its config."""

    max_pixels: int = MAX_PIXELS  # width x height above this is refused before decoding
    formats: tuple[str, ...] | None = None  # Pillow format names accepted ("JPEG", ...); None = any
    max_scans: int = MAX_SCANS  # a JPEG with more scans (SOS segments) is refused before decoding


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0][:200] if text else "") or type(e).__name__


def _open_path(path: Path, name: str, allow_empty: bool = False) -> BinaryIO:
    """Open a regular file for reading. O_NONBLOCK: opening a FIFO must not wait for a writer;
    fstat then refuses anything that is not a regular file before a byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ImageError("file not found", name, "not_found") from None
    except IsADirectoryError:
        raise ImageError("is a folder, not an image", name, "not_a_file") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e.strerror or _first_line(e)}", name, "not_a_file") from None
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise ImageError("is a folder, not an image", name, "not_a_file")
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageError("not a regular file (a device, pipe or socket), not an image", name, "not_a_file")
    if st.st_size == 0 and not allow_empty:
        os.close(fd)
        raise ImageError("the file is empty (0 bytes)", name, "empty")
    return os.fdopen(fd, "rb")


def _header(src: BinaryIO, limits: ImageLimits, name: str) -> Image.Image:
    """Open and check the header (format, pixel count); nothing is decoded yet.
    (Pillow's own DecompressionBombWarning only fires above its 89 MP threshold, past our cap;
    warnings are not silenced here because the filters are process-wide, not per thread.)"""
    try:
        img = Image.open(src)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels: {_first_line(e)}", name, "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageError("not an image in any format Pillow reads (unknown format, or not an image at all)",
                         name, "unsupported") from None
    except Exception as e:  # a header bad enough to upset the format's parser
        raise ImageError(f"corrupt image header: {_first_line(e)}", name, "undecodable") from None
    if limits.formats is not None and img.format not in limits.formats:
        raise ImageError(f"{img.format} images are not accepted here; send one of "
                         f"{', '.join(sorted(limits.formats))}", name, "unsupported")
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageError(f"too many pixels: {width}x{height} is more than the {limits.max_pixels} "
                         f"accepted", name, "too_many_pixels")
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})", name, "undecodable")
    return img


# In a JPEG's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker
# (0xD0-0xD7); the first 0xFF followed by anything else (but 0xFF, a fill byte) is the next marker.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn stand alone; SOI and EOI are handled apart


def jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """How many scans (SOS segments) a JPEG's first image holds, counted by walking its segments
    (never decoding): a segment's length skips its payload, an SOS's entropy-coded data runs to
    the next marker. Stops at the first EOI, at the end of the bytes, at anything that is not a
    marker where one must be (the decoder will judge that), or once `stop_after` is passed."""
    if data[:2] != b"\xff\xd8":
        return 0
    pos, scans, n = 2, 0, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI: the first image ends here
            break
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if pos + 4 > n:
            break
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
            found = _NEXT_MARKER.search(data, end)
            end = found.start() if found else n
        pos = end
    return scans


def _check_cost(src: BinaryIO, img: Image.Image, limits: ImageLimits, name: str) -> None:
    """Refuse a JPEG with more scans than `limits.max_scans`, from its bytes, before decoding."""
    if img.format not in ("JPEG", "MPO"):
        return
    src.seek(0)
    scans = jpeg_scans(src.read(), stop_after=limits.max_scans)
    if scans > limits.max_scans:
        raise ImageError(f"too many scans: this JPEG holds more than {limits.max_scans} scans (each one is a "
                         f"decoding pass over every pixel; photos have about 10), so it is not decoded",
                         name, "too_many_scans")


def _decode(src: BinaryIO, limits: ImageLimits, name: str) -> Image.Image:
    """Header checks, the cost budget, then decoding of the first frame; every failure becomes
    an ImageError."""
    img = _header(src, limits, name)
    _check_cost(src, img, limits, name)
    try:
        img.load()  # the first frame of an animation
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels: {_first_line(e)}", name, "too_many_pixels") from None
    except Exception as e:  # truncated or corrupt data, whichever decoder raised it
        raise ImageError(f"cannot decode the image (truncated or corrupt): {_first_line(e)}", name,
                         "undecodable") from None
    return _to_rgb(img, name)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """EXIF rotation applied, alpha flattened onto white, 16-bit scaled to 8-bit, RGB."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not lose the photo
        pass
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            # 16-bit grey: 65535 is white (Pillow's own conversion would clip at 255)
            img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8))
        return img.convert("RGB")
    except Exception as e:
        raise ImageError(f"cannot convert its colour mode {img.mode} to RGB: {_first_line(e)}", name,
                         "undecodable") from None


def read_photo_file(path: str | Path, name: str | None = None) -> bytes:
    """A photo file's bytes; `ImageError` (not_found, not_a_file) for anything but a regular
    file, which is refused before a byte is read."""
    with _open_path(resolve_photo_path(path), name or str(path), allow_empty=True) as f:
        return f.read()


def probe_image(image: str | Path | bytes, limits: ImageLimits | None = None, name: str | None = None
                ) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) from the header alone, with the same checks and errors as
    `load_image` short of decoding the pixels."""
    limits = limits or ImageLimits()
    if isinstance(image, (bytes, bytearray)):
        name = name or "<image bytes>"
        if not image:
            raise ImageError("the image is empty (0 bytes)", name, "empty")
        img = _header(io.BytesIO(bytes(image)), limits, name)
        return img.format, img.size
    name = name or str(image)
    with _open_path(resolve_photo_path(image), name) as f:
        img = _header(f, limits, name)
        return img.format, img.size


def load_image(image: ImageInput, limits: ImageLimits | None = None, name: str | None = None) -> Image.Image:
    """A photo (path, bytes or PIL image) -> RGB PIL image, or `ImageError` saying why not.

    `name` is what errors call the photo (default: the path, or "<image bytes>")."""
    limits = limits or ImageLimits()
    if isinstance(image, Image.Image):
        name = name or "<image>"
        width, height = image.size
        if width * height > limits.max_pixels:  # decoded already, but not yet resized and encoded
            raise ImageError(f"too many pixels: {width}x{height} is more than the {limits.max_pixels} "
                             f"accepted", name, "too_many_pixels")
        if width < 1 or height < 1:
            raise ImageError(f"the image has no pixels ({width}x{height})", name, "undecodable")
        return _to_rgb(image, name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        name = name or "<image bytes>"
        if len(image) == 0:
            raise ImageError("the image is empty (0 bytes)", name, "empty")
        return _decode(io.BytesIO(bytes(image)), limits, name)
    if isinstance(image, (str, Path)):
        name = name or str(image)
        with _open_path(resolve_photo_path(image), name) as f:
            return _decode(f, limits, name)
    raise TypeError(f"expected a path, bytes or a PIL image, not {type(image).__name__}")
