"""A tiny procedural image grammar with a typical mode, its renderer and an oracle that reads it back.

Captions fix two attributes, colour and shape ("a red circle": 6 x 4 = 24 prompts). The free
attributes (position, size, background) are drawn from skewed distributions: one typical value
dominates each of them. As in real captions (reporting bias), a caption never names the typical value
of a free attribute and names an atypical one ("a large red circle at top left on black") 30% of the
time. So a bare caption's pictures are more typical than pictures overall, and classifier-free
guidance, which weighs p(x | caption) / p(x), pulls samples of "a red circle" onto the typical picture
(a medium object, centred, on white), as FLUX does on real prompts. Without the naming, guidance would
have nothing to pull on: colour and shape tell nothing about the free attributes.

`read(image)` is the oracle: it recovers every attribute from pixels alone and says whether the
image is clean (one crisp object on a flat background). Shapes are told apart by template matching
(soft IoU with each shape drawn at the detected place and size, searched over a small neighbourhood),
not by area ratios, which misread ragged generated squares as circles.

Everything is deterministic, numpy + pillow only. Geometry: continuous coordinates on the 32 x 32
canvas, pixel (row i, column j) covering [j, j+1) x [i, i+1), so the canvas centre is (16, 16).
"""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

SIZE = 32  # canvas side, pixels

# Fixed attributes: named in the caption.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (245, 130, 10),
    "yellow": (245, 225, 20),
    "green": (35, 165, 55),
    "blue": (30, 70, 220),
    "purple": (135, 45, 175),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Free attributes: never named in the caption, each discrete and skewed toward one typical value.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "grey": (175, 175, 175),
    "pale blue": (170, 210, 250),
    "black": (30, 30, 30),
}
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) of the shape's bounding-box centre
    "centre": (16.0, 16.0),
    "top-left": (10.0, 10.0),
    "top-right": (22.0, 10.0),
    "bottom-left": (10.0, 22.0),
    "bottom-right": (22.0, 22.0),
}
SIZES: dict[str, float] = {  # name -> side of the shape's bounding box, pixels (all 4 shapes fill it)
    "small": 10.0,
    "medium": 14.0,
    "large": 18.0,
}

# The skewed distributions of the free attributes (probabilities; each sums to 1).
DISTRIBUTIONS: dict[str, dict[str, float]] = {
    "position": {"centre": 0.6, "top-left": 0.1, "top-right": 0.1, "bottom-left": 0.1, "bottom-right": 0.1},
    "size": {"medium": 0.6, "small": 0.2, "large": 0.2},
    "background": {"white": 0.55, "grey": 0.15, "pale blue": 0.15, "black": 0.15},
}
FREE_ATTRIBUTES: tuple[str, ...] = ("position", "size", "background")
FIXED_ATTRIBUTES: tuple[str, ...] = ("colour", "shape")
TYPICAL: dict[str, str] = {k: max(d, key=d.get) for k, d in DISTRIBUTIONS.items()}
ALL_ATTRIBUTES: tuple[str, ...] = FIXED_ATTRIBUTES + FREE_ATTRIBUTES


NAMING_PROBABILITY = 0.3  # how often a caption names an atypical free attribute (each independently)


def caption(colour: str, shape: str, size: str | None = None, position: str | None = None,
            background: str | None = None) -> str:
    """ "a red circle"; with named free attributes "a large red circle at top left on black"."""
    words = ["a"] + ([size] if size else []) + [colour, shape]
    words += ["at", position.replace("-", " ")] if position else []
    words += ["on", background] if background else []
    return " ".join(words)


def named_caption(attrs: dict, named: dict) -> str:
    """The caption of an image with attributes `attrs` that names the free attributes with named[k]
    true, typical values never (they go without saying)."""
    free = {k: attrs[k] for k in FREE_ATTRIBUTES if named.get(k) and attrs[k] != TYPICAL[k]}
    return caption(attrs["colour"], attrs["shape"], **free)


def prompts() -> list[str]:
    """The 24 bare captions, colour-major: "a red circle", "a red square", ... (the evaluation's prompts)."""
    return [caption(c, s) for c in COLOURS for s in SHAPES]


def all_captions() -> list[str]:
    """Every caption the data set can carry: the 24 bare ones first, then each with every combination
    of named atypical free attributes (24 x 3 sizes x 5 positions x 4 backgrounds = 1440 in all)."""
    optional = [[None] + [v for v in values if v != TYPICAL[k]]
                for k, values in (("size", SIZES), ("position", POSITIONS), ("background", BACKGROUNDS))]
    out = prompts()
    for z in optional[0]:
        for p in optional[1]:
            for b in optional[2]:
                if z or p or b:
                    out += [caption(c, s, z, p, b) for c in COLOURS for s in SHAPES]
    return out


_BACKGROUND_PHRASE = re.compile(r"\bon (" + "|".join(BACKGROUNDS) + r")\b")
_POSITION_PHRASE = re.compile(r"\b(" + "|".join(p.replace("-", " ") for p in POSITIONS if p != "centre") + r")\b")


def named_attributes(text: str) -> dict:
    """The attributes a caption names: colour and shape (exactly one each, or ValueError), and any of
    size, position and background it names ("a large red circle at top left on pale blue")."""
    text = text.lower().replace(",", " ")
    out = {}
    m = _BACKGROUND_PHRASE.search(text)  # first, so that "on pale blue" is not read as the colour blue
    if m:
        out["background"] = m.group(1)
        text = text[:m.start()] + text[m.end():]
    m = _POSITION_PHRASE.search(text)
    if m:
        out["position"] = m.group(1).replace(" ", "-")
    words = text.split()
    for name, values in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES)):
        found = [w for w in words if w in values]
        if len(found) > 1 or (not found and name != "size"):
            raise ValueError(f"not a caption of this grammar: {text!r}")
        if found:
            out[name] = found[0]
    return out


def parse_caption(text: str) -> tuple[str, str]:
    """(colour, shape) named by a caption such as "a red circle"; raises ValueError otherwise."""
    a = named_attributes(text)
    return a["colour"], a["shape"]


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def _polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices (x, y), clockwise on screen (y down), of a polygonal shape; None for the circle."""
    r = side / 2.0
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":  # apex up, base at the bottom of the box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def _edges(shape: str) -> np.ndarray:
    """Outward unit normals and offsets of a unit shape (side 2, centre 0) as rows (nx, ny, d):
    a point p is inside the polygon of half-side r when max(nx*px + ny*py - d*r) <= 0."""
    verts = np.array(_polygon(shape, 0.0, 0.0, 2.0))
    rows = []
    for a, b in zip(verts, np.roll(verts, -1, axis=0)):
        e = b - a
        n = np.array([e[1], -e[0]]) / np.hypot(*e)  # outward for clockwise-on-screen vertices
        rows.append((n[0], n[1], float(n @ a)))
    return np.array(rows)


_EDGES = {s: _edges(s) for s in SHAPES if s != "circle"}
_AREA_FACTOR = {"circle": np.pi / 4.0, "square": 1.0, "triangle": 0.5, "diamond": 0.5}  # area / side**2
_PIX = np.arange(SIZE) + 0.5  # pixel centres


def coverage(shape: str, cx, cy, side) -> np.ndarray:
    """Approximate antialiased coverage in [0, 1] of `shape` on the canvas, from its signed distance
    (coverage = clip(0.5 - distance)); cx, cy, side broadcast (arrays of K candidates give (K, 32, 32))."""
    cx, cy, side = (np.asarray(v, dtype=np.float32)[..., None, None] for v in (cx, cy, side))
    x = _PIX[None, :].astype(np.float32) - cx  # (..., 1, 32)
    y = _PIX[:, None].astype(np.float32) - cy  # (..., 32, 1)
    r = side / 2.0
    if shape == "circle":
        sd = np.sqrt(x * x + y * y) - r
    else:
        sd = None
        for nx, ny, d in _EDGES[shape]:
            v = (np.float32(nx) * x - np.float32(d) * r) + np.float32(ny) * y  # separable: one full-size add
            sd = v if sd is None else np.maximum(sd, v, out=sd)
    return np.clip(np.float32(0.5) - sd, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------

def render(colour: str, shape: str, position: str = "centre", size: str = "medium",
           background: str = "white", supersample: int = 4) -> np.ndarray:
    """One image, uint8 (32, 32, 3): the shape drawn at `supersample` x resolution and box-downsampled
    with pillow (area antialiasing, no ringing)."""
    fg, bg = COLOURS[colour], BACKGROUNDS[background]
    cx, cy = POSITIONS[position]
    n = SIZE * supersample
    # Inside test at the hi-res pixel centres, exact for the polygons and the circle (pillow's own
    # polygon fill rounds vertices and spills a quarter pixel over one side).
    c = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    x, y = c[None, :] - cx, c[:, None] - cy
    r = SIZES[size] / 2.0
    if shape == "circle":
        inside = x * x + y * y <= r * r
    else:
        inside = np.ones((n, n), dtype=bool)
        for nx, ny, d in _EDGES[shape]:
            inside &= nx * x + ny * y - d * r <= 1e-9
    big = Image.new("RGB", (n, n), bg)
    big.paste(Image.new("RGB", (n, n), fg), mask=Image.fromarray((inside * 255).astype(np.uint8)))
    if supersample == 1:
        return np.asarray(big, dtype=np.uint8).copy()
    return np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8).copy()


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def sample_attributes(rng, n: int) -> list[dict]:
    """n attribute dicts: colour and shape uniform, free attributes from DISTRIBUTIONS. Drawn one
    image at a time, so the first k of n draws do not depend on n."""
    rng = _as_rng(rng)
    colour_names = list(COLOURS)
    cumulative = {name: (list(d), np.cumsum(list(d.values()))) for name, d in DISTRIBUTIONS.items()}
    out = []
    for _ in range(n):
        u = rng.random(2 + len(cumulative))
        a = {"colour": colour_names[min(int(u[0] * len(colour_names)), len(colour_names) - 1)],
             "shape": SHAPES[min(int(u[1] * len(SHAPES)), len(SHAPES) - 1)]}
        for v, (name, (keys, cum)) in zip(u[2:], cumulative.items()):
            a[name] = keys[min(int(np.searchsorted(cum, v * cum[-1], side="right")), len(keys) - 1)]
        out.append(a)
    return out


def sample_naming(rng, n: int) -> list[dict]:
    """n draws of which free attributes a caption names (each with NAMING_PROBABILITY)."""
    u = _as_rng(rng).random((n, len(FREE_ATTRIBUTES)))
    return [dict(zip(FREE_ATTRIBUTES, row < NAMING_PROBABILITY)) for row in u]


def sample_captions(rng, n: int) -> tuple[list[dict], list[str]]:
    """n data-set draws without pixels: (attribute dicts, their captions as the data set words them)."""
    rng = _as_rng(rng)
    attrs = sample_attributes(rng, n)
    return attrs, [named_caption(a, named) for a, named in zip(attrs, sample_naming(rng, n))]


def bare_caption_attributes(rng, n: int) -> list[dict]:
    """The attributes of those of n data-set draws whose caption is bare ("a red circle"): the data's
    own answer to what "a red circle" looks like, more typical than the data overall."""
    attrs, captions = sample_captions(rng, n)
    return [a for a, c in zip(attrs, captions) if c == caption(a["colour"], a["shape"])]


def sample(rng, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """(images uint8 (n, 32, 32, 3), captions, attribute dicts); rng: a numpy Generator or a seed."""
    attrs, captions = sample_captions(rng, n)
    images = np.stack([render(**a) for a in attrs]) if n else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, captions, attrs


def all_attribute_combinations() -> list[dict]:
    """Every combination of every attribute (24 captions x 5 x 3 x 4 = 1440 dicts)."""
    return [{"colour": c, "shape": s, "position": p, "size": z, "background": b}
            for c in COLOURS for s in SHAPES for p in POSITIONS for z in SIZES for b in BACKGROUNDS]


def contact_sheet(images: np.ndarray, columns: int = 8, scale: int = 4, gap: int = 2) -> Image.Image:
    """Images tiled in a grid, upscaled `scale` x with nearest neighbour, on a mid-grey ground."""
    n = len(images)
    rows = max(1, -(-n // columns))
    cell = SIZE * scale + gap
    sheet = Image.new("RGB", (columns * cell + gap, rows * cell + gap), (128, 128, 128))
    for i, im in enumerate(images):
        tile = Image.fromarray(np.asarray(im, dtype=np.uint8)).resize((SIZE * scale,) * 2, Image.Resampling.NEAREST)
        sheet.paste(tile, (gap + (i % columns) * cell, gap + (i // columns) * cell))
    return sheet


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array(list(COLOURS.values()), dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_POS_NAMES = list(POSITIONS)
_POS_XY = np.array(list(POSITIONS.values()), dtype=np.float32)
_SIZE_NAMES = list(SIZES)
_SIZE_PX = np.array(list(SIZES.values()), dtype=np.float32)

# Template search around a guess (from the bounding box, or from the moments): a coarse grid, then a
# finer one around its best.
_COARSE = np.stack(np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0, 2.0], indexing="ij"),
                   -1).reshape(-1, 3).astype(np.float32)
_FINE = np.stack(np.meshgrid([-0.5, 0.0, 0.5], [-0.5, 0.0, 0.5], [-0.5, 0.0, 0.5], indexing="ij"),
                 -1).reshape(-1, 3).astype(np.float32)

# Thresholds of the oracle (RGB distances are Euclidean on 0..255).
OBJECT_DISTANCE = 60.0     # a pixel this far from the background seeds the object
MIN_OBJECT_AREA = 4        # pixels (coverage > 1/2) for an object to count as found
CLEAN_MIN_IOU = 0.90       # best template soft-IoU for a crisp shape
CLEAN_MAX_STRAY = 2        # object-coloured pixels allowed outside the main object
CLEAN_MAX_BG_SPREAD = 20.0  # 95th percentile distance of background pixels from the background
CLEAN_MAX_BG_ERROR = 40.0   # distance of the background from its palette colour
CLEAN_MAX_FG_ERROR = 50.0   # distance of the object's median colour from its palette colour
CLEAN_MAX_FG_SPREAD = 40.0  # 90th percentile distance of object core pixels from their median


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: (labels with 0 = none, count)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    count = 0
    for i0, j0 in zip(*np.nonzero(mask)):
        if labels[i0, j0]:
            continue
        count += 1
        labels[i0, j0] = count
        stack = [(i0, j0)]
        while stack:
            i, j = stack.pop()
            for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
                if 0 <= a < h and 0 <= b < w and mask[a, b] and not labels[a, b]:
                    labels[a, b] = count
                    stack.append((a, b))
    return labels, count


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """8-neighbourhood dilation."""
    m = mask.copy()
    for _ in range(steps):
        p = np.pad(m, 1)
        m = np.zeros_like(m)
        for di in (0, 1, 2):
            for dj in (0, 1, 2):
                m |= p[di:di + SIZE, dj:dj + SIZE]
    return m


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask)


def _nearest(rgb: np.ndarray, table: np.ndarray) -> tuple[int, float]:
    d = np.linalg.norm(table - rgb[None, :], axis=1)
    k = int(np.argmin(d))
    return k, float(d[k])


def _soft_iou(t: np.ndarray, a: np.ndarray) -> np.ndarray:
    inter = np.minimum(t, a).sum(axis=(1, 2))
    return inter / np.maximum(t.sum(axis=(1, 2)) + a.sum() - inter, 1e-6)


def _fit(shape: str, a_obj: np.ndarray, cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    """Best (soft IoU, cx, cy, side) of `shape` against the coverage map a_obj, searched around a guess."""
    guess = np.array([cx, cy, side], np.float32)
    for grid in (_COARSE, _FINE):
        cand = guess + grid
        cand[:, 2] = np.maximum(cand[:, 2], 2.0)
        iou = _soft_iou(coverage(shape, cand[:, 0], cand[:, 1], cand[:, 2]), a_obj)
        k = int(np.argmax(iou))
        guess = cand[k]
    return float(iou[k]), float(guess[0]), float(guess[1]), float(guess[2])


def read(image) -> dict:
    """Read an image back from its pixels alone.

    Returns a dict with the five attributes (colour, shape, position, size, background; None where
    no object is found), `clean` (one crisp object on a flat background), and the measurements
    behind them: `iou` (best template soft-IoU), `margin` (its lead over the next shape),
    `centre`, `side`, `object_rgb`, `background_rgb`, `bg_spread`, `stray` and `reasons` (why the
    image is not clean; empty when it is).
    """
    img = np.asarray(image)
    if img.dtype != np.uint8:  # float in [0, 1]
        img = np.clip(np.round(np.asarray(img, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if img.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected ({SIZE}, {SIZE}, 3), got {img.shape}")
    px = img.astype(np.float32)

    # Background: median of the 1-pixel border, named by the nearest palette background.
    border = np.concatenate([px[0], px[-1], px[1:-1, 0], px[1:-1, -1]])
    bg = np.median(border, axis=0)
    bg_k, bg_err = _nearest(bg, _BG_RGB)
    out = {"colour": None, "shape": None, "position": None, "size": None,
           "background": _BG_NAMES[bg_k], "clean": False, "iou": 0.0, "margin": 0.0,
           "centre": None, "side": None, "object_rgb": None, "background_rgb": tuple(float(v) for v in bg),
           "bg_spread": None, "stray": None, "reasons": []}

    dist = np.linalg.norm(px - bg, axis=-1)
    seed = dist > OBJECT_DISTANCE
    if seed.sum() < MIN_OBJECT_AREA:
        out["reasons"].append("no object")
        return out
    labels, count = _components(seed)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    main = labels == (1 + int(np.argmax(areas)))

    # Object colour: median of the core (the far half of the main component's pixels).
    d_main = dist[main]
    core = main & (dist >= np.median(d_main))
    fg = np.median(px[core], axis=0)
    fg_k, fg_err = _nearest(fg, _COLOUR_RGB)

    # Soft coverage: each pixel's position on the line from the background to the object colour.
    axis = fg - bg
    alpha = np.clip(((px - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    solid = alpha > 0.5
    labels, count = _components(solid)
    if count == 0:
        out["reasons"].append("no object")
        return out
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    main_id = 1 + int(np.argmax(areas))
    main = labels == main_id
    if areas[main_id - 1] < MIN_OBJECT_AREA:
        out["reasons"].append("no object")
        return out
    stray = int(areas.sum() - areas[main_id - 1])
    region = _dilate(main, 1)
    a_obj = np.where(region, alpha, 0.0).astype(np.float32)

    # Template matching: each shape searched around a bounding-box guess of the main component.
    rows, cols = np.nonzero(main)
    x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
    cx0, cy0, side0 = (x0 + x1) / 2.0, (y0 + y1) / 2.0, float(max(x1 - x0, y1 - y0))
    # Each shape also gets a guess from the moments of the coverage (robust to ragged edges); the
    # better of the two searches counts.
    area = float(a_obj.sum())
    mx = float((a_obj.sum(axis=0) * _PIX).sum() / area)
    my = float((a_obj.sum(axis=1) * _PIX).sum() / area)
    best = {}
    for shape in SHAPES:
        side_m = float(np.sqrt(area / _AREA_FACTOR[shape]))
        my_s = my - (side_m / 6.0 if shape == "triangle" else 0.0)  # the triangle's centroid is r/3 low
        best[shape] = max(_fit(shape, a_obj, cx0, cy0, side0), _fit(shape, a_obj, mx, my_s, side_m))
    ranked = sorted(SHAPES, key=lambda s: -best[s][0])
    shape = ranked[0]
    iou, cx, cy, side = best[shape]

    pos_k = int(np.argmin(np.linalg.norm(_POS_XY - np.array([cx, cy], np.float32), axis=1)))
    size_k = int(np.argmin(np.abs(_SIZE_PX - side)))

    # Cleanliness.
    far = ~_dilate(main, 2)
    bg_spread = float(np.percentile(dist[far], 95)) if far.any() else float("inf")
    inner = _erode(main) & (alpha > 0.9)
    if not inner.any():
        inner = main
    fg_spread = float(np.percentile(np.linalg.norm(px[inner] - np.median(px[inner], axis=0), axis=-1), 90))
    reasons = []
    if stray > CLEAN_MAX_STRAY:
        reasons.append(f"{stray} stray object pixels")
    if iou < CLEAN_MIN_IOU:
        reasons.append(f"template IoU {iou:.2f}")
    if bg_spread > CLEAN_MAX_BG_SPREAD:
        reasons.append(f"background spread {bg_spread:.0f}")
    if bg_err > CLEAN_MAX_BG_ERROR:
        reasons.append(f"background off palette by {bg_err:.0f}")
    if fg_err > CLEAN_MAX_FG_ERROR:
        reasons.append(f"object colour off palette by {fg_err:.0f}")
    if fg_spread > CLEAN_MAX_FG_SPREAD:
        reasons.append(f"object colour spread {fg_spread:.0f}")

    out.update(colour=_COLOUR_NAMES[fg_k], shape=shape, position=_POS_NAMES[pos_k], size=_SIZE_NAMES[size_k],
               clean=not reasons, iou=iou, margin=iou - best[ranked[1]][0], centre=(cx, cy), side=side,
               object_rgb=tuple(float(v) for v in fg), bg_spread=bg_spread, stray=stray, reasons=reasons)
    return out


def free_attributes(attrs: dict) -> tuple[float, ...]:
    """One-hot features of the free attributes (position, size, background) of one reading or one
    attribute dict, each block scaled by 1/sqrt(3) so that a vector's dot product with itself is 1
    and with another is the fraction of free attributes they share (a cosine kernel for Vendi).
    A missing value (None: the oracle found no object) leaves its block all zero."""
    w = 1.0 / np.sqrt(len(FREE_ATTRIBUTES))
    feats: list[float] = []
    for name in FREE_ATTRIBUTES:
        value = attrs.get(name)
        feats.extend(w if value == k else 0.0 for k in DISTRIBUTIONS[name])
    return tuple(feats)


def free_feature_names() -> list[str]:
    """Names of the entries of `free_attributes`, e.g. "position=centre"."""
    return [f"{name}={k}" for name in FREE_ATTRIBUTES for k in DISTRIBUTIONS[name]]
