"""A dependency-free PNG bar chart (zlib + struct and a 5x7 bitmap font).

The benchmark must draw its chart on a bare CI machine; a plotting library would be the
largest dependency of the project for one picture.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

# 5x7 glyphs, one string of 7 rows per character, '#' = ink.
_FONT_ROWS = {
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####", "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....#.#..#..##..",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##.#.##...##...##...#", "N": "#...##...###..##.#.##..###...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".####.....#.....###.....#....#####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    " ": "." * 35, ".": "." * 30 + "..#..", "-": "." * 15 + "#####" + "." * 15,
    "/": "....#....#...#...#...#...#....#....", "%": "##..###..#...#...#...#...#..###..##",
    "(": "...#...#...#....#....#.....#.....#.", ")": ".#.....#.....#....#....#...#...#...",
    "=": "..........#####.....#####..........",
    ",": "." * 20 + ".##....#...#...", "+": ".......#....#..#####..#....#.......",
    ":": "......##...##.......##...##........",
}
GLYPH_W, GLYPH_H, SCALE = 5, 7, 2


def _glyph(ch: str) -> str:
    return _FONT_ROWS.get(ch.upper(), _FONT_ROWS[" "])


class Canvas:
    def __init__(self, width: int, height: int, bg=(255, 255, 255)) -> None:
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color) -> None:
        row = bytes(color) * max(0, min(w, self.w - x))
        for yy in range(max(0, y), min(self.h, y + h)):
            start = (yy * self.w + max(0, x)) * 3
            self.px[start:start + len(row)] = row

    def text(self, x: int, y: int, s: str, color=(0, 0, 0)) -> None:
        for i, ch in enumerate(s):
            rows = _glyph(ch)
            for gy in range(GLYPH_H):
                for gx in range(GLYPH_W):
                    if rows[gy * GLYPH_W + gx] == "#":
                        self.rect(x + (i * (GLYPH_W + 1) + gx) * SCALE, y + gy * SCALE,
                                  SCALE, SCALE, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3:(y + 1) * self.w * 3])
                       for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack("!I", len(data)) + body + struct.pack("!I", zlib.crc32(body))

        return (b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack("!IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def text_width(s: str) -> int:
    return len(s) * (GLYPH_W + 1) * SCALE


PALETTE = [(52, 101, 164), (115, 210, 22), (204, 0, 0), (245, 121, 0), (117, 80, 123),
           (193, 125, 17)]


def _short(v: float) -> str:
    return f"{v / 1000:.1f}k" if v >= 10_000 else f"{v:.3g}"


def bar_chart(title: str, groups: Sequence[str], series: Sequence[str],
              values: Sequence[Sequence[float | None]], unit: str) -> bytes:
    """Horizontal grouped bars: one group per metric, one bar per configuration."""
    label_w = max(text_width(s) for s in [*groups, *series]) + 20
    bar_h, gap = 16, 14
    plot_w = 520
    height = 50 + len(groups) * (20 + len(series) * (bar_h + 4) + gap)
    c = Canvas(label_w + plot_w + 240, height)
    c.text(10, 10, title)
    y = 40
    for g, group in enumerate(groups):
        row = [v for v in values[g] if v is not None]
        top = max(row) if row else 1.0
        c.text(10, y, group)
        y += 20
        for s, name in enumerate(series):
            v = values[g][s]
            c.text(20, y + 2, name, (80, 80, 80))
            if v is not None:
                w = int(plot_w * (v / top)) if top > 0 else 0
                c.rect(label_w, y, max(w, 1), bar_h, PALETTE[s % len(PALETTE)])
                c.text(label_w + max(w, 1) + 6, y + 2, f"{_short(v)} {unit[g]}")
            y += bar_h + 4
        y += gap
    return c.png()
