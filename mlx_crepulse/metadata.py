"""What is written into and read back from PNG files: each image's full recipe.

Two text chunks per PNG:
- `parameters`: the recipe in the AUTOMATIC1111 format that image browsers and prompt readers
  understand (the prompt, an optional "Negative prompt:" line, then "Key: value, ..." settings);
- `crepulse`: the recipe as JSON (`Recipe.to_dict()`, with its schema version), everything needed to
  make the same image again, plus `index` (the image's position in its batch, None for a contact
  sheet) and `image_seed`.

Repulsion couples the images of a batch, so one image is reproduced by re-running its whole batch
(same n, same batch seed) and taking image `index`.
"""

import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Optional

CHUNK = "crepulse"
PARAMETERS = "parameters"


def slug(text: str, limit: int = 48) -> str:
    """A file-name stem from a prompt: lowercase ASCII words joined by '-', cut at a word boundary."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if len(s) > limit:
        s = s[:limit].rsplit("-", 1)[0] or s[:limit]
    return s or "image"


def describe_method(d: Optional[dict]) -> str:
    """A short human description of a recipe's method dict (schema 2):
    'contextual scale=1e+08 iterations=50 repelled steps=1 blocks=all'."""
    if not d:
        return "none"
    if not isinstance(d, dict):
        return str(d)
    name = d.get("name")
    if name == "contextual":
        blocks = d.get("blocks")
        blocks = "+".join(str(b) for b in blocks) if isinstance(blocks, list) else str(blocks)
        parts = [f"scale={_num(d.get('scale'))}", f"iterations={d.get('iterations')}",
                 f"repelled steps={d.get('repelled_steps')}", f"blocks={blocks}"]
        if d.get("tokens", "text") != "text":
            parts.append(f"tokens={d['tokens']}")
    elif name == "particle":
        parts = [f"scale={_num(d.get('scale'))}", f"until={_num(d.get('until'))}"]
    elif name == "cads":
        parts = [f"noise_scale={_num(d.get('noise_scale'))}", f"tau1={_num(d.get('tau1'))}",
                 f"tau2={_num(d.get('tau2'))}"]
    else:
        parts = []
    return " ".join([str(name)] + parts)


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# --- the AUTOMATIC1111 `parameters` text ------------------------------------------------------------------

def _quote(v) -> str:
    """A1111's quoting: values with a comma, colon, quote or newline are written as JSON strings."""
    text = _num(v)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def a1111_parameters(recipe: dict) -> str:
    """The recipe as AUTOMATIC1111 writes it: prompt, optional negative prompt line, then settings.
    FLUX's embedded guidance goes where Forge puts it ("Distilled CFG Scale"); "CFG scale" is true CFG."""
    lines = [str(recipe.get("prompt", ""))]
    if recipe.get("negative_prompt"):
        lines.append(f"Negative prompt: {recipe['negative_prompt']}")
    seed = recipe.get("image_seed")
    fields = [("Steps", recipe.get("steps")), ("Sampler", "Euler"), ("Schedule type", "Simple"),
              ("CFG scale", recipe.get("true_cfg", 1.0))]
    if recipe.get("guidance") is not None:
        fields.append(("Distilled CFG Scale", recipe["guidance"]))
    fields += [("Seed", seed if seed is not None else recipe.get("seed")),
               ("Size", f"{recipe.get('width')}x{recipe.get('height')}"), ("Model", recipe.get("model"))]
    if recipe.get("quantize"):
        fields.append(("Quantization", f"{recipe['quantize']}-bit"))
    fields += [("Batch size", recipe.get("n"))]
    if recipe.get("index") is not None:
        fields.append(("Batch pos", recipe["index"]))
    loras = recipe.get("loras") or []
    if isinstance(loras, list) and loras:  # A1111's own way of naming LoRAs is in the prompt; Forge lists them so
        fields.append(("Lora hashes", ", ".join(f"{l.get('file')}: {str(l.get('sha256'))[:12]}" for l in loras
                                                if isinstance(l, dict))))
        fields.append(("LoRAs", ", ".join(f"{l.get('file')} x{l.get('scale')}" for l in loras if isinstance(l, dict))))
    fields += [("Batch seed", recipe.get("seed")), ("Diversity", describe_method(recipe.get("method"))),
               ("Version", f"mlx-crepulse {recipe.get('version')}")]
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


# --- PNG files -----------------------------------------------------------------------------------------------

def write_png(path, image, recipe: dict, overwrite: bool = True) -> Path:
    """Write `image` (a PIL image) to `path` with its recipe; returns the path written.

    The file appears whole or not at all (written beside it under a hidden name, then moved into
    place). With `overwrite=False` an existing file is never replaced: "-1", "-2", ... is added to
    the name instead, and the first free name is taken atomically."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text(PARAMETERS, a1111_parameters(recipe))  # tEXt, or iTXt when the prompt is not latin-1
    info.add_text(CHUNK, json.dumps(recipe, ensure_ascii=True, allow_nan=False), zip=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
            return path
        return _place(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _place(tmp: Path, path: Path) -> Path:
    """Give `tmp` the first free name among path, path-1, path-2, ... without ever replacing a file."""
    for i in range(100000):
        target = path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")
        if target.exists():
            continue
        try:
            os.link(tmp, target)  # fails if target appeared meanwhile: never clobbers
            return target
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links: check, then move
            if not target.exists():
                os.replace(tmp, target)
                return target
    raise OSError(f"no free file name for {path}")


def read_text_chunks(path) -> dict:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})


def read_png(path) -> dict:
    """The recipe written by `write_png` (the `crepulse` JSON chunk). Raises ValueError when the file
    has none (not a PNG, or a PNG made by something else)."""
    try:
        chunks = read_text_chunks(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if CHUNK not in chunks:
        other = " (it has AUTOMATIC1111-style parameters, but not the full recipe)" if PARAMETERS in chunks else ""
        raise ValueError(f"{path} has no mlx-crepulse recipe{other}")
    try:
        recipe = json.loads(chunks[CHUNK])
    except json.JSONDecodeError as e:
        raise ValueError(f"the recipe in {path} is damaged: {e}") from e
    if not isinstance(recipe, dict):
        raise ValueError(f"the recipe in {path} is damaged: not a JSON object")
    return recipe
