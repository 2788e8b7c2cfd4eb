"""Is a PNG (a screenshot of ``report.html``) blank? CI renders the report in headless Chromium
and checks the screenshot with ``python -m moetrain.report.png SHOT.png``.

Pixels are read with Pillow when it is installed (matplotlib depends on it), else by this
module's own decoder (zlib: 8-bit grey/RGB/RGBA, not interlaced), which is also what the tests
check against Pillow.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (8-bit, no palette)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _unfilter_row(kind: int, row: bytearray, prev: bytearray, bpp: int) -> None:
    """Undo one scanline's filter in place (``prev``: the previous decoded row)."""
    n = len(row)
    if kind == 0:
        return
    if kind == 2:
        row[:] = ((np.frombuffer(row, np.uint8) + np.frombuffer(prev, np.uint8)) & 255).tobytes()
        return
    for i in range(n):
        left = row[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 255
        elif kind == 3:
            row[i] = (row[i] + ((left + prev[i]) >> 1)) & 255
        elif kind == 4:
            up_left = prev[i - bpp] if i >= bpp else 0
            row[i] = (row[i] + _paeth(left, prev[i], up_left)) & 255
        else:
            raise ValueError(f"PNG: unknown filter type {kind}")


def decode_png(data: bytes) -> np.ndarray:
    """``[height, width, channels]`` uint8 pixels of an 8-bit, non-interlaced, non-palette PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError("PNG: no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise ValueError(f"PNG: unsupported depth {depth} / colour type {colour} / interlace")
    bpp = _CHANNELS[colour]
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    prev, out = bytearray(stride), bytearray()
    for y in range(height):
        start = y * (stride + 1)
        row = bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter_row(raw[start], row, prev, bpp)
        out += row
        prev = row
    return np.frombuffer(bytes(out), np.uint8).reshape(height, width, bpp)


def read_rgb(path: Path) -> np.ndarray:
    """``[height, width, 3]`` uint8 (alpha composited on white)."""
    try:
        from PIL import Image
    except ImportError:
        pixels = decode_png(path.read_bytes()).astype(np.float64)
    else:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGBA"), dtype=np.float64)
    if pixels.shape[2] in (1, 2):  # grey (+ alpha)
        pixels = np.concatenate([pixels[..., :1].repeat(3, 2), pixels[..., 1:]], axis=2)
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3:] / 255.0
        pixels = pixels[..., :3] * alpha + 255.0 * (1 - alpha)
    return np.rint(pixels).astype(np.uint8)


@dataclass
class Ink:
    colours: int  # distinct RGB colours
    non_white: float  # fraction of pixels that are not pure white


def ink(rgb: np.ndarray) -> Ink:
    flat = rgb.reshape(-1, 3).astype(np.int64)
    codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return Ink(int(np.unique(codes).size), float((codes != 0xFFFFFF).mean()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moetrain.report.png", description=__doc__)
    parser.add_argument("png", type=Path)
    parser.add_argument("--min-colours", type=int, default=200)
    parser.add_argument("--min-non-white", type=float, default=0.05)
    args = parser.parse_args(argv)
    found = ink(read_rgb(args.png))
    verdict = found.colours >= args.min_colours and found.non_white >= args.min_non_white
    print(
        f"{args.png}: {found.colours} colours (>= {args.min_colours}), "
        f"{100 * found.non_white:.1f}% non-white (>= {100 * args.min_non_white:.1f}%): "
        f"{'ok' if verdict else 'BLANK'}"
    )
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
