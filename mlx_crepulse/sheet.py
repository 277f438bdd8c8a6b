"""The contact sheet: a batch's images in one grid, so a varied batch is seen at a glance."""

import math

TILE = (256, 512)  # small images are scaled up (nearest) to at least 256 px, big ones down to 512


def contact_sheet(images, columns=None, gap=4):
    """A grid of PIL images: tiles scaled to a whole factor (nearest) to at least 256 px when small, down
    to at most 512 px when large; about sqrt(n) columns."""
    from PIL import Image

    w, h = images[0].size
    side = max(w, h)
    if side < TILE[0]:
        f = math.ceil(TILE[0] / side)
        tw, th, resample = w * f, h * f, Image.Resampling.NEAREST
    elif side > TILE[1]:
        f = TILE[1] / side
        tw, th, resample = max(1, round(w * f)), max(1, round(h * f)), Image.Resampling.LANCZOS
    else:
        tw, th, resample = w, h, None
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * gap, rows * th + (rows + 1) * gap), (24, 24, 24))
    for i, im in enumerate(images):
        tile = im.convert("RGB") if resample is None else im.convert("RGB").resize((tw, th), resample)
        r, c = divmod(i, cols)
        sheet.paste(tile, (gap + c * (tw + gap), gap + r * (th + gap)))
    return sheet
