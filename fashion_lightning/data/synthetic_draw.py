"""The synthetic catalog's drawing language: a pen in template coordinates, one silhouette per articleType.

Each attribute is a visual cue a small CNN can learn (see :mod:`fashion_lightning.data.synthetic`):
articleType is the silhouette (:data:`DRAWERS`), baseColour the fill (:data:`COLOURS`), gender a charcoal
glyph in the top-left corner, season a faint background pattern. :func:`render` draws one product;
the random draws it makes, and their order, are part of the generator's output (``GENERATOR_VERSION``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
JPEG_QUALITY = 85
CANVAS_WH = (60, 80)  # Kaggle "small" images are 60x80 (w x h)

#: Kaggle spellings -> nominal RGB. The trailing ones are rare (Other-folding material).
COLOURS: dict[str, Colour] = {
    "Black": (25, 25, 28),
    "White": (246, 246, 244),
    "Blue": (35, 85, 205),
    "Navy Blue": (22, 32, 92),
    "Red": (205, 30, 35),
    "Green": (40, 145, 60),
    "Grey": (128, 128, 132),
    "Brown": (115, 72, 38),
    "Pink": (240, 128, 170),
    "Yellow": (240, 205, 35),
    "Purple": (120, 48, 150),
    "Orange": (242, 128, 28),
    "Silver": (185, 188, 195),
    "Gold": (200, 160, 50),
    "Beige": (214, 192, 150),
    "Maroon": (118, 18, 42),
    "Olive": (108, 110, 38),
    "Lavender": (185, 165, 228),
    "Teal": (0, 125, 128),
}


# ----------------------------------------------------------------------------- pen


class Pen:
    """ImageDraw wrapper drawing in 60x80 template coordinates, shifted and scaled per item."""

    CX, CY = 30.0, 42.0

    def __init__(self, draw: ImageDraw.ImageDraw, scale: float, dx: float, dy: float) -> None:
        self.draw, self.s, self.dx, self.dy = draw, scale, dx, dy

    def _p(self, x: float, y: float) -> tuple[float, float]:
        return self.CX + (x - self.CX) * self.s + self.dx, self.CY + (y - self.CY) * self.s + self.dy

    def _box(self, box: tuple[float, float, float, float]) -> list[float]:
        return [*self._p(box[0], box[1]), *self._p(box[2], box[3])]

    def _w(self, width: float) -> int:
        return max(1, round(width * self.s))

    def poly(self, pts: list[tuple[float, float]], fill: Colour, outline: Colour | None = None) -> None:
        self.draw.polygon([self._p(x, y) for x, y in pts], fill=fill, outline=outline)

    def mirror_poly(self, pts: list[tuple[float, float]], fill: Colour, outline: Colour | None = None) -> None:
        """Draw ``pts`` and its mirror image about the vertical centre line (left/right parts)."""
        self.poly(pts, fill, outline)
        self.poly([(2 * self.CX - x, y) for x, y in pts], fill, outline)

    def rect(self, box: tuple[float, float, float, float], fill: Colour | None, outline: Colour | None = None,
             width: float = 1) -> None:  # fmt: skip
        self.draw.rectangle(self._box(box), fill=fill, outline=outline, width=self._w(width))

    def rrect(self, box: tuple[float, float, float, float], radius: float, fill: Colour,
              outline: Colour | None = None) -> None:  # fmt: skip
        self.draw.rounded_rectangle(self._box(box), radius=radius * self.s, fill=fill, outline=outline)

    def ellipse(self, box: tuple[float, float, float, float], fill: Colour | None, outline: Colour | None = None,
                width: float = 1) -> None:  # fmt: skip
        self.draw.ellipse(self._box(box), fill=fill, outline=outline, width=self._w(width))

    def line(self, pts: list[tuple[float, float]], fill: Colour, width: float = 1) -> None:
        self.draw.line([self._p(x, y) for x, y in pts], fill=fill, width=self._w(width))

    def arc(self, box: tuple[float, float, float, float], start: float, end: float, fill: Colour,
            width: float = 1) -> None:  # fmt: skip
        self.draw.arc(self._box(box), start, end, fill=fill, width=self._w(width))

    def chord(self, box: tuple[float, float, float, float], start: float, end: float, fill: Colour,
              outline: Colour | None = None) -> None:  # fmt: skip
        self.draw.chord(self._box(box), start, end, fill=fill, outline=outline)


@dataclass(frozen=True)
class Paint:
    """An item's jittered fill colour with a darker shade (seams, outlines) and a lighter one."""

    fill: Colour
    dark: Colour
    light: Colour

    @classmethod
    def of(cls, rgb: np.ndarray) -> Paint:
        fill = np.clip(rgb, 0, 255)
        # White items need a visible outline on a white background; black ones a lighter seam.
        dark = fill * 0.62 if fill.mean() > 60 else fill + 45
        light = fill + (255 - fill) * 0.45
        return cls(_colour(fill), _colour(dark), _colour(light))


def _colour(values: np.ndarray) -> Colour:
    r, g, b = (int(round(v)) for v in np.clip(values, 0, 255))
    return r, g, b


WHITE: Colour = (248, 248, 248)
CHARCOAL: Colour = (45, 45, 48)
SOLE_DARK: Colour = (55, 50, 45)


def _tshirt(p: Pen, c: Paint) -> None:
    p.poly([(23, 18), (37, 18), (48, 27), (44, 35), (41, 32), (41, 66), (19, 66), (19, 32), (16, 35), (12, 27)],
           c.fill, c.dark)  # fmt: skip
    p.arc((24, 13, 36, 24), 0, 180, c.dark, 2)  # neckline


def _shirt(p: Pen, c: Paint) -> None:
    p.poly([(23, 16), (37, 16), (46, 22), (52, 60), (46, 61), (41, 34), (41, 68), (19, 68), (19, 34), (14, 61),
            (8, 60), (14, 22)], c.fill, c.dark)  # fmt: skip
    p.mirror_poly([(23, 15), (30, 24), (26, 13)], c.light, c.dark)  # collar wings
    p.line([(30, 24), (30, 68)], c.dark, 1)
    for y in (30, 38, 46, 54, 62):
        p.ellipse((29, y, 31, y + 2), WHITE)


def _sweatshirt(p: Pen, c: Paint) -> None:
    p.poly([(22, 17), (38, 17), (47, 22), (53, 60), (46, 62), (42, 34), (42, 66), (18, 66), (18, 34), (14, 62),
            (7, 60), (13, 22)], c.fill, c.dark)  # fmt: skip
    p.rect((18, 62, 42, 69), c.dark)  # ribbed hem band
    p.mirror_poly([(7, 58), (14, 60), (14, 65), (6, 63)], c.dark)  # cuffs
    p.ellipse((24, 14, 36, 22), c.dark)  # round neck rib
    p.rect((23, 46, 37, 58), None, c.dark)  # kangaroo pocket


def _jeans(p: Pen, c: Paint) -> None:
    p.poly([(17, 14), (43, 14), (45, 73), (33, 73), (30, 34), (27, 73), (15, 73)], c.fill, c.dark)
    p.rect((17, 14, 43, 19), c.dark)
    stitch = (205, 140, 55)
    p.arc((19, 12, 28, 28), 0, 90, stitch)
    p.arc((32, 12, 41, 28), 90, 180, stitch)
    p.line([(30, 19), (30, 30)], stitch)


def _track_pants(p: Pen, c: Paint) -> None:
    p.poly([(18, 14), (42, 14), (43, 68), (40, 74), (33, 74), (30, 34), (27, 74), (20, 74), (17, 68)],
           c.fill, c.dark)  # fmt: skip
    p.rect((18, 14, 42, 17), c.dark)
    p.line([(29, 17), (27, 24)], WHITE)  # drawstring
    p.line([(31, 17), (33, 24)], WHITE)
    p.mirror_poly([(18, 18), (20, 18), (19, 72), (17, 72)], WHITE)  # side stripes


def _shorts(p: Pen, c: Paint) -> None:
    p.poly([(15, 24), (45, 24), (49, 56), (33, 58), (30, 38), (27, 58), (11, 56)], c.fill, c.dark)
    p.rect((15, 24, 45, 29), c.dark)


def _casual_shoes(p: Pen, c: Paint) -> None:
    p.poly([(8, 52), (10, 44), (22, 42), (32, 36), (44, 34), (52, 38), (53, 53)], c.fill, c.dark)
    p.rect((7, 53, 54, 57), SOLE_DARK)  # thin sole
    for x in (26, 30, 34):
        p.line([(x, 39), (x + 3, 37)], c.light, 1)  # laces


def _sports_shoes(p: Pen, c: Paint) -> None:
    p.poly([(8, 50), (11, 40), (24, 37), (34, 29), (46, 27), (53, 32), (53, 50)], c.fill, c.dark)
    p.rrect((6, 50, 55, 58), 3, WHITE, (150, 150, 150))  # chunky white sole
    p.line([(15, 47), (30, 42), (44, 35)], c.light, 2)  # swoosh
    p.line([(6, 58), (55, 58)], SOLE_DARK, 2)


def _flip_flops(p: Pen, c: Paint) -> None:
    for x0 in (9, 33):
        p.ellipse((x0, 12, x0 + 18, 72), c.fill, c.dark)
        mid = x0 + 9
        p.line([(mid, 22), (x0 + 2, 42)], CHARCOAL, 2)
        p.line([(mid, 22), (x0 + 16, 42)], CHARCOAL, 2)


def _watches(p: Pen, c: Paint) -> None:
    p.rect((24, 4, 36, 76), c.fill, c.dark)  # strap
    p.ellipse((15, 25, 45, 55), c.fill, c.dark)  # bezel
    p.ellipse((19, 29, 41, 51), WHITE)  # dial
    p.line([(30, 40), (30, 31)], CHARCOAL, 2)
    p.line([(30, 40), (37, 43)], CHARCOAL, 1)


def _handbags(p: Pen, c: Paint) -> None:
    p.arc((17, 14, 43, 48), 180, 360, c.dark, 3)  # handle
    p.poly([(13, 34), (47, 34), (52, 70), (8, 70)], c.fill, c.dark)
    p.line([(13, 42), (47, 42)], c.dark, 1)
    p.rect((27, 38, 33, 45), (205, 170, 60))  # clasp


def _backpacks(p: Pen, c: Paint) -> None:
    p.arc((24, 8, 36, 20), 180, 360, c.dark, 2)  # top loop
    p.rrect((15, 14, 45, 72), 8, c.fill, c.dark)
    p.rrect((19, 44, 41, 67), 4, c.dark)  # front pocket
    p.line([(19, 30), (41, 30)], c.light, 1)  # zip
    p.mirror_poly([(11, 22), (15, 20), (15, 62), (11, 60)], c.dark)  # shoulder straps


def _caps(p: Pen, c: Paint) -> None:
    p.chord((10, 22, 46, 62), 180, 360, c.fill, c.dark)  # crown
    p.poly([(28, 42), (56, 42), (54, 48), (30, 47)], c.dark)  # brim
    p.ellipse((26, 20, 30, 24), c.dark)  # button
    p.line([(28, 23), (28, 42)], c.dark)


def _perfume(p: Pen, c: Paint) -> None:
    p.rect((24, 14, 36, 25), (200, 165, 60), (120, 95, 30))  # cap
    p.rect((26, 25, 34, 32), (200, 200, 205))  # neck
    p.rrect((17, 32, 43, 72), 5, c.fill, c.dark)
    p.rect((21, 45, 39, 58), WHITE)  # label


def _belts(p: Pen, c: Paint) -> None:
    p.rect((4, 36, 56, 46), c.fill, c.dark)
    p.rect((8, 32, 19, 50), None, (175, 175, 180), 2)  # buckle
    for x in (30, 36, 42, 48):
        p.ellipse((x, 40, x + 2, 42), c.dark)


def _cushion_covers(p: Pen, c: Paint) -> None:
    p.rrect((9, 20, 51, 62), 6, c.fill, c.dark)
    p.ellipse((24, 35, 36, 47), c.light, c.dark)


DRAWERS: dict[str, Callable[[Pen, Paint], None]] = {
    "Tshirts": _tshirt, "Shirts": _shirt, "Sweatshirts": _sweatshirt, "Jeans": _jeans, "Shorts": _shorts,
    "Track Pants": _track_pants, "Casual Shoes": _casual_shoes, "Sports Shoes": _sports_shoes,
    "Flip Flops": _flip_flops, "Watches": _watches, "Handbags": _handbags, "Backpacks": _backpacks, "Caps": _caps,
    "Perfume and Body Mist": _perfume, "Belts": _belts, "Cushion Covers": _cushion_covers,
}  # fmt: skip


def gender_marker(draw: ImageDraw.ImageDraw, gender: str) -> None:
    """Top-left charcoal glyph: the gender cue (shape-coded so it never tints the product colour).

    Bars of different orientation rather than small shapes: a 7-pixel square and a 7-pixel disc
    were too alike for a small CNN at 80x60 under flips and rotations.
    """
    if gender == "Men":
        draw.rectangle((1, 2, 14, 5), fill=CHARCOAL)  # horizontal bar
    elif gender == "Women":
        draw.rectangle((2, 1, 5, 14), fill=CHARCOAL)  # vertical bar
    elif gender == "Boys":
        draw.rectangle((2, 2, 7, 7), fill=CHARCOAL)  # small square
    elif gender == "Girls":
        draw.rectangle((1, 6, 12, 8), fill=CHARCOAL)  # plus sign
        draw.rectangle((5, 1, 7, 12), fill=CHARCOAL)
    else:  # Unisex
        draw.ellipse((1, 1, 11, 11), outline=CHARCOAL, width=2)


def season_background(draw: ImageDraw.ImageDraw, season: str, size: tuple[int, int]) -> None:
    """Faint near-white pattern: the season cue (catalog backgrounds stay essentially white)."""
    w, h = size
    if season == "Summer":
        for y in range(4, h, 8):
            for x in range(4, w, 8):
                draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(238, 222, 180))
    elif season == "Winter":
        for y in range(3, h, 6):
            draw.line([(0, y), (w, y)], fill=(205, 220, 245))
    elif season == "Fall":
        for k in range(-h, w, 7):
            draw.line([(k, 0), (k + h, h)], fill=(232, 212, 195))
    elif season == "Spring":
        for x in range(3, w, 6):
            draw.line([(x, 0), (x, h)], fill=(210, 238, 210))


def render(article: str, colour: str, gender: str, season: str, rng: np.random.Generator) -> Image.Image:
    """Draw one product on a 60x80 canvas (background pattern, silhouette, gender glyph, pixel noise)."""
    img = Image.new("RGB", CANVAS_WH, WHITE)
    draw = ImageDraw.Draw(img)
    season_background(draw, season, CANVAS_WH)
    rgb = np.asarray(COLOURS[colour], dtype=np.float64) * rng.uniform(0.92, 1.06) + rng.normal(0, 5, 3)
    pen = Pen(draw, scale=rng.uniform(0.88, 1.06), dx=rng.uniform(-3, 3), dy=rng.uniform(-3, 3))
    DRAWERS[article](pen, Paint.of(rgb))
    gender_marker(draw, gender)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-4, 5, size=(CANVAS_WH[1], CANVAS_WH[0], 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()
