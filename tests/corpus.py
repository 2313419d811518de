"""A corpus of photos as users really send them, generated on the fly (nothing binary is
committed): broken files, every common format and colour mode, rotated, tiny, huge, bombs.

Each `Sample` says what the shared loader must make of it: "ok" (an RGB picture, checked by
`check` where the right answer is known) or the `ImageError.kind` it must raise.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from conftest import REPO

CAT = (REPO / "examples" / "cat.jpg").read_bytes()
RED, BLUE, WHITE = (220, 30, 30), (30, 60, 220), (255, 255, 255)

ANY_ERROR = "any_error"  # a file whose failure mode depends on where the damage fell
ANYTHING = "anything"  # fuzzed bytes: a picture or an ImageError, never anything else


@dataclass
class Sample:
    name: str  # file name, with the extension a user's file would have
    data: bytes
    expect: str  # "ok", an ImageError kind, ANY_ERROR or ANYTHING
    check: Callable[[Image.Image], None] | None = None  # what the loaded RGB picture must look like
    server: str | None = None  # the server's own verdict where it differs (formats it does not accept)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def two_colour(size=(64, 32), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    """Left half one colour, right half another: rotation and flips show in the pixels."""
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return img


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None,
            zeros_row: int = 0) -> bytes:
    """A PNG written byte by byte (Pillow cannot write 16-bit colour). `rows` are the filtered
    scanlines; with `zeros_row` the image is `height` rows of that many zero bytes, compressed
    as a stream (a real decompression bomb: megabytes of pixels in a few kB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if rows is None:
        comp = zlib.compressobj(9)
        line = b"\0" * (zeros_row + 1)
        parts = [comp.compress(line * min(1024, height - i)) for i in range(0, height, 1024)]
        idat = b"".join(parts) + comp.flush()
    else:
        idat = zlib.compress(rows)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares its size in the header but holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def gif_bomb() -> bytes:
    """A GIF whose screen and frame claim 65535x65535 pixels (4.3 billion), in 40 bytes."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00;"
    return screen + frame


def scan_bomb(side: int = 3000, scans: int = 4000) -> bytes:
    """A progressive-JPEG scan bomb: a flat `side` x `side` photo saved progressive, its last
    (AC refinement) scan, with the Huffman table before it, repeated until the file holds
    `scans` scans. Each repeat is ~40 bytes (one end-of-band run covers the flat image) but
    costs the decoder a pass over every pixel: 3000 x 3000 with 4000 scans is 180 kB that
    Pillow takes ~20 s to decode (libjpeg only warns about the repeated progression)."""
    data = encode(Image.new("RGB", (side, side), (120, 130, 140)), "JPEG", progressive=True, quality=90)
    marks, pos = [], 2  # (start, end, marker) of each segment; an SOS's end takes in its data
    while data[pos + 1] != 0xD9:
        marker, end = data[pos + 1], pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if marker == 0xDA:
            end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(data, end).start()
        marks.append((pos, end, marker))
        pos = end
    last = max(i for i, m in enumerate(marks) if m[2] == 0xDA)
    start = marks[last - 1][0] if marks[last - 1][2] == 0xC4 else marks[last][0]
    have = sum(1 for m in marks if m[2] == 0xDA)
    cut = marks[last][1]
    return data[:cut] + data[start:cut] * (scans - have) + data[cut:]


def rgb16_png(colour: tuple[int, int, int], alpha: int | None = None, size: int = 8) -> bytes:
    px = struct.pack(">HHH", *colour) + (struct.pack(">H", alpha) if alpha is not None else b"")
    rows = (b"\0" + px * size) * size
    return png_raw(size, size, 16, 2 if alpha is None else 6, rows)


def exif_rotated(orientation: int) -> bytes:
    img = two_colour()
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def bad_exif_jpeg() -> bytes:
    """A JPEG whose APP1 EXIF segment is garbage."""
    good = encode(two_colour(), "JPEG", quality=95)
    junk = b"Exif\0\0" + b"\xde\xad\xbe\xef" * 8
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    return good[:2] + app1 + good[2:]


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE, (30, 180, 60))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_alpha() -> bytes:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0] + list(RED) + [0] * 762)
    img.paste(0, (0, 0, 16, 32))  # left half: index 0, declared transparent
    return encode(img, "PNG", transparency=0)


def flipped_bytes(data: bytes, seed: int, n: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for k in rng.integers(len(b) // 4, len(b), n):
        b[k] ^= 0xFF
    return bytes(b)


# --- checks on the loaded picture --------------------------------------------------------------

def near(px, colour, tol=40) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, colour))


def expect_size(w: int, h: int) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.size == (w, h), img.size
    return check


def left_right(left, right, size=(64, 32)) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.size == size, img.size
        w, h = img.size
        assert near(img.getpixel((w // 4, h // 2)), left), img.getpixel((w // 4, h // 2))
        assert near(img.getpixel((3 * w // 4, h // 2)), right), img.getpixel((3 * w // 4, h // 2))
    return check


def top_bottom(top, bottom, size=(32, 64)) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.size == size, f"rotation not applied: {img.size}"
        w, h = img.size
        assert near(img.getpixel((w // 2, h // 4)), top), img.getpixel((w // 2, h // 4))
        assert near(img.getpixel((w // 2, 3 * h // 4)), bottom), img.getpixel((w // 2, 3 * h // 4))
    return check


def uniform(colour) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        a = np.asarray(img, dtype=np.int32)
        assert np.abs(a - np.array(colour)).max() <= 3, a.reshape(-1, 3)[:2]
    return check


def grey(img: Image.Image) -> None:
    a = np.asarray(img, dtype=np.int32)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def grey16_scaled(img: Image.Image) -> None:
    w, h = img.size
    assert img.getpixel((w // 4, h // 2)) == (255, 255, 255), "16-bit white must stay white"
    assert near(img.getpixel((3 * w // 4, h // 2)), (128, 128, 128), 2), img.getpixel((3 * w // 4, h // 2))


def grey16() -> bytes:
    a = np.full((16, 16), 32896, dtype=np.uint16)  # mid grey in 16 bits
    a[:, :8] = 65535
    return encode(Image.fromarray(a), "PNG")


def corpus() -> list[Sample]:
    """Every kind of photo users send, with what the loader must make of it."""
    rgb = two_colour()
    rgba = two_colour(mode="RGBA", left=(*RED, 255), right=(0, 0, 0, 0))
    la = Image.merge("LA", (Image.new("L", (64, 32), 90), two_colour(mode="L", left=255, right=0)))
    cmyk = Image.new("CMYK", (32, 32), (0, 220, 220, 0))
    samples = [
        # broken or not images at all
        Sample("empty.jpg", b"", "empty"),
        Sample("truncated.jpg", CAT[: len(CAT) * 2 // 5], "undecodable"),
        Sample("truncated.png", encode(Image.effect_noise((256, 256), 60).convert("RGB"), "PNG")[:9000],
               "undecodable"),
        Sample("header-only.jpg", CAT[:300], ANY_ERROR),
        Sample("page.jpg", b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>", "unsupported"),
        Sample("notes.png", b"these are not the pixels you are looking for\n" * 3, "unsupported"),
        Sample("noise.webp", np.random.default_rng(0).bytes(4096), "unsupported"),
        Sample("damaged.jpg", flipped_bytes(CAT, 1), ANYTHING),
        Sample("damaged.png", flipped_bytes(encode(rgb, "PNG"), 2, n=3), ANYTHING),
        # formats
        Sample("photo.png", encode(rgb, "PNG"), "ok", left_right(RED, BLUE)),
        Sample("photo.gif", encode(rgb, "GIF"), "ok", left_right(RED, BLUE)),
        Sample("photo.webp", encode(rgb, "WEBP", lossless=True), "ok", left_right(RED, BLUE)),
        Sample("photo.bmp", encode(rgb, "BMP"), "ok", left_right(RED, BLUE)),
        Sample("photo.tiff", encode(rgb, "TIFF"), "ok", left_right(RED, BLUE), server="unsupported"),
        Sample("really-a-jpeg.png", encode(rgb, "JPEG", quality=95), "ok", left_right(RED, BLUE)),
        # colour modes
        Sample("grey.jpg", encode(rgb.convert("L"), "JPEG"), "ok", grey),
        Sample("bilevel.png", encode(rgb.convert("1"), "PNG"), "ok", grey),
        Sample("cmyk.jpg", encode(cmyk, "JPEG", quality=95), "ok", uniform((255, 35, 35))),
        Sample("cmyk.tiff", encode(cmyk, "TIFF"), "ok", uniform((255, 35, 35)), server="unsupported"),
        Sample("grey16.png", grey16(), "ok", grey16_scaled),
        Sample("rgb16.png", rgb16_png((65535, 0, 0)), "ok", uniform((255, 0, 0))),
        Sample("rgba16.png", rgb16_png((0, 0, 65535), alpha=0), "ok", uniform(WHITE)),
        Sample("float.tiff", encode(Image.new("F", (16, 16), 100.0), "TIFF"), "ok", uniform((100, 100, 100)),
               server="unsupported"),
        Sample("lab.tiff", encode(Image.new("LAB", (16, 16), (50, 0, 0)), "TIFF"), "ok", expect_size(16, 16),
               server="unsupported"),
        # transparency: flattened onto white
        Sample("palette-alpha.png", palette_with_alpha(), "ok", left_right(WHITE, RED, (32, 32))),
        Sample("rgba.png", encode(rgba, "PNG"), "ok", left_right(RED, WHITE)),
        Sample("rgba.webp", encode(rgba, "WEBP", lossless=True), "ok", left_right(RED, WHITE)),
        Sample("grey-alpha.png", encode(la, "PNG"), "ok", left_right((90, 90, 90), WHITE)),
        # animation: the first frame
        Sample("animated.gif", animated_gif(), "ok", uniform(RED)),
        # phone photos rotated by their EXIF orientation (6: turn 90 clockwise, 8: 90 anti-, 3: 180)
        Sample("exif-6.jpg", exif_rotated(6), "ok", top_bottom(RED, BLUE)),
        Sample("exif-8.jpg", exif_rotated(8), "ok", top_bottom(BLUE, RED)),
        Sample("exif-3.jpg", exif_rotated(3), "ok", left_right(BLUE, RED)),
        Sample("bad-exif.jpg", bad_exif_jpeg(), "ok", left_right(RED, BLUE)),
        # sizes
        Sample("one-pixel.png", encode(Image.new("RGB", (1, 1), RED), "PNG"), "ok", uniform(RED)),
        Sample("strip.png", encode(Image.new("RGB", (3000, 1), BLUE), "PNG"), "ok", expect_size(3000, 1)),
        Sample("huge.jpg", encode(Image.new("RGB", (4000, 3000), BLUE), "JPEG", quality=80), "ok",
               expect_size(4000, 3000)),
        # more pixels than any caller accepts, judged from the header before decoding
        Sample("over-cap.png", png_header_only(10_000, 10_000), "too_many_pixels"),
        Sample("bomb.png", png_raw(9000, 9000, 8, 0, zeros_row=9000), "too_many_pixels"),
        Sample("bomb-header.png", png_header_only(60_000, 60_000), "too_many_pixels"),
        Sample("bomb.gif", gif_bomb(), "too_many_pixels"),
        # a progressive JPEG too costly to decode, judged from its scan count before decoding
        Sample("scan-bomb.jpg", scan_bomb(64, 500), "too_many_scans"),
        Sample("progressive.jpg", encode(rgb, "JPEG", progressive=True, quality=95), "ok", left_right(RED, BLUE)),
    ]
    return samples


def write_corpus(folder: Path) -> list[Sample]:
    folder.mkdir(parents=True, exist_ok=True)
    samples = corpus()
    for s in samples:
        (folder / s.name).write_bytes(s.data)
    return samples
