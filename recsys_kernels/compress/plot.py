"""A dependency-free PNG chart of compression reports: quality against bytes and latency.

matplotlib is not a dependency of the package (and is not installed where this was written), so
this draws on an RGB raster and writes the PNG itself (zlib + struct): two panels, NDCG@k
against model bytes and against scoring + top-k latency, one colour per configuration, a line
through its steps (the first point is the fp32 input model) and a filled square on its final
step. Labels use a built-in 3x5 pixel font (upper-case letters, digits and a few signs).
"""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

# 3x5 glyphs, rows top to bottom, "#" = ink
_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", ".##", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": (".##", "#..", "#.#", "#.#", ".##"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", ".#."),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."), "P": ("##.", "#.#", "##.", "#..", "#.."),
    "Q": (".#.", "#.#", "#.#", "##.", ".##"), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": (".##", "#..", ".#.", "..#", "##."), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"), "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    ".": ("...", "...", "...", "...", ".#."), "-": ("...", "...", "###", "...", "..."),
    "+": ("...", ".#.", "###", ".#.", "..."), "@": (".#.", "#.#", "###", "#..", ".##"),
    "%": ("#.#", "..#", ".#.", "#..", "#.#"), "/": ("..#", "..#", ".#.", "#..", "#.."),
    ":": ("...", ".#.", "...", ".#.", "..."), "(": (".#.", "#..", "#..", "#..", ".#."),
    ")": (".#.", "..#", "..#", "..#", ".#."), " ": ("...", "...", "...", "...", "..."),
    "_": ("...", "...", "...", "...", "###"),
}

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
           (140, 86, 75), (227, 119, 194)]


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, y0), min(self.h, y1 + 1)):
            for x in range(max(0, x0), min(self.w, x1 + 1)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color, width: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            x = round(x0 + (x1 - x0) * s / steps)
            y = round(y0 + (y1 - y0) * s / steps)
            self.rect(x - width // 2, y - width // 2, x + (width - 1) // 2, y + (width - 1) // 2, color)

    def text(self, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for r, row in enumerate(glyph):
                for c, cell in enumerate(row):
                    if cell == "#":
                        self.rect(x + c * scale, y + r * scale, x + (c + 1) * scale - 1, y + (r + 1) * scale - 1,
                                  color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _ticks(lo: float, hi: float) -> list[float]:
    return [lo + (hi - lo) * i / 4 for i in range(5)]


def _fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"


def _panel(cv: Canvas, x0: int, y0: int, w: int, h: int, series, xlabel: str, ylabel: str) -> None:
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    if not xs:
        return
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = min(ys), max(ys)
    pad_x, pad_y = (xhi - xlo) * 0.08 or abs(xhi) * 0.1 or 1.0, (yhi - ylo) * 0.1 or abs(yhi) * 0.1 or 0.01
    xlo, xhi, ylo, yhi = xlo - pad_x, xhi + pad_x, ylo - pad_y, yhi + pad_y
    grey, black = (200, 200, 200), (0, 0, 0)

    def px(x: float, y: float) -> tuple[int, int]:
        return (x0 + round((x - xlo) / (xhi - xlo) * w), y0 + h - round((y - ylo) / (yhi - ylo) * h))

    for t in _ticks(xlo, xhi):
        X, _ = px(t, ylo)
        cv.line(X, y0, X, y0 + h, grey)
        cv.text(X - 12, y0 + h + 6, _fmt(t), scale=2)
    for t in _ticks(ylo, yhi):
        _, Y = px(xlo, t)
        cv.line(x0, Y, x0 + w, Y, grey)
        cv.text(x0 - 52, Y - 5, _fmt(t), scale=2)
    cv.line(x0, y0 + h, x0 + w, y0 + h, black, 2)
    cv.line(x0, y0, x0, y0 + h, black, 2)
    cv.text(x0 + w // 2 - 4 * 2 * len(xlabel) // 2, y0 + h + 24, xlabel, scale=2)
    cv.text(x0, y0 - 16, ylabel, scale=2)
    for color, pts in series:
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            cv.line(*px(xa, ya), *px(xb, yb), color, 2)
        for i, (x, y) in enumerate(pts):
            X, Y = px(x, y)
            r = 5 if i == len(pts) - 1 else 3
            cv.rect(X - r, Y - r, X + r, Y + r, color if i else black)


def plot_reports(reports: Sequence, path: str) -> str:
    """Write the PNG chart of `reports` (CompressionReport objects with measured quality and
    latency) to `path`; returns the path."""
    k = reports[0].k if reports else 10
    series_bytes, series_lat, legend = [], [], []
    for i, rep in enumerate(reports):
        color = PALETTE[i % len(PALETTE)]
        steps = [s for s in rep.steps if s.ndcg is not None and s.score_ms is not None]
        series_bytes.append((color, [(s.bytes / 1024, s.ndcg) for s in steps]))
        series_lat.append((color, [(s.score_ms + s.topk_ms, s.ndcg) for s in steps]))
        legend.append((color, rep.name or f"config {i + 1}"))
    cv = Canvas(1100, 560)
    cv.text(20, 12, f"NDCG@{k} VS MODEL SIZE AND LATENCY (BLACK: FP32 INPUT; LINE: STEPS; BIG: FINAL)", scale=2)
    _panel(cv, 90, 70, 400, 330, series_bytes, "KB", f"NDCG@{k}")
    _panel(cv, 640, 70, 400, 330, series_lat, "SCORING + TOP-K MS", f"NDCG@{k}")
    for j, (color, name) in enumerate(legend):
        y = 470 + 20 * (j // 2)
        x = 90 + 500 * (j % 2)
        cv.rect(x, y, x + 10, y + 10, color)
        cv.text(x + 18, y, name, scale=2)
    with open(path, "wb") as f:
        f.write(cv.png())
    return path
