"""The command line: `python -m mlx_crepulse "a prompt"` (or the `mlx-crepulse` script).

    mlx-crepulse "a red fox in the snow"               # 4 varied images + a contact sheet in ./out
    mlx-crepulse "a red fox" --model schnell -q 4 -n 6 --diversity 0.8 --seed 1
    mlx-crepulse --from out/a-red-fox-1-2.png           # the same image again, bit for bit
    mlx-crepulse info out/a-red-fox-1-2.png             # its full recipe
    mlx-crepulse download schnell -q 4                  # -> ./FLUX.1-schnell-4bit, for --model
    mlx-crepulse convert flux1-dev.safetensors --base dev -q 8 -o flux-dev-8bit

Generation is the default command: a first argument that is not `info`, `download`, `convert` or
`generate` is the prompt (write `generate "info"` for a prompt that is one of those words).

Contract: stdout carries nothing but the paths of the files written, one a line, as each is written
(so `mlx-crepulse "..." | xargs open` works); progress, warnings and errors go to stderr. Exit codes:
0 done; 2 bad input, one line `error: ...` on stderr, checked before any work starts and with no file
written (unknown model, weights missing offline, size not a multiple of 16, n < 1, empty prompt, a
prompt over the model's token limit unless --truncate, an unwritable output folder); 130
interrupted (Ctrl-C stops after the current step; finished batches are kept).

Choices made here:
- Files: `<output>/<prompt-slug>-<seed>-<i>.png` and `<prompt-slug>-<seed>-sheet.png` (the contact
  sheet, when more than one image was made), output `./out` by default. An existing file is never
  replaced: "-1", "-2", ... is added. Each file is written whole or not at all. The sheet carries
  the batch's recipe too (no index), so `--from sheet.png` makes the whole batch again.
- `--from FILE.png` re-runs the image's whole batch (repulsion couples the images, so image i alone
  cannot be made) and writes only image i; `--all` writes the batch and its sheet. Options given
  beside `--from` override the recipe (then it is a variation, not a copy).
- `--diversity D` (0..1; 0.5 by default, 0 = plain seeds) maps onto each method's range:
  contextual: scale = lo * (hi / lo) ** D over the model's recommended range (`Defaults`, FLUX.1:
  1e8 to 5e9), iterations and steps from the model's defaults, all blocks; `--repulsion-*` set each
  one directly. particle: scale = D (the engine normalises particle guidance by the latents' size, so the
  push is the same at any resolution). cads: noise_scale = 0.5 * D (0.25, the CADS default, at D = 0.5),
  seeded per batch. A batch of one image has nothing to push apart: the method is dropped unless it
  was asked for explicitly, which is then an error.
- A prompt over the T5 limit is an error (diffusers would cut it silently); `--truncate` accepts the
  cut and says how many tokens went.
- `--batch-size B` splits n images into batches of B (image i keeps seed + i; each image's recipe
  names its own batch). Ctrl-C stops after the current step; the batches already finished are kept.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

from . import metadata, weights
from .pipeline import DEFAULT_DIVERSITY, __version__
from .tokenizer import Tokenizer

SUBCOMMANDS = ("generate", "info", "download", "convert")
METHODS = ("none", "contextual", "particle", "cads")
DEFAULT_OUTPUT = "out"
DEFAULT_N = 4
SIZE_MULTIPLE = 16  # FLUX.1: 8x VAE and 2x2 patches; the engine checks its own multiple again
PARTICLE_SCALE = 1.0  # --method particle: scale = diversity (the engine normalises the push by the latent size)
CADS_MAX_NOISE = 0.5  # --method cads: noise_scale = diversity * 0.5 (0.25, the CADS default, at 0.5)
SHEET_TILE = (256, 512)  # contact sheet tiles: small images scaled up (nearest) to at least 256 px, big ones down to 512


class UsageError(Exception):
    """Bad input: printed as one line `error: ...`, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def err(*parts, end="\n"):
    print(*parts, end=end, file=sys.stderr, flush=True)


# --- entry point ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"generate": cmd_generate, "info": cmd_info, "download": cmd_download, "convert": cmd_convert}
    if argv and argv[0] in SUBCOMMANDS:
        command, argv = commands[argv[0]], argv[1:]
    else:
        command = cmd_generate
    try:
        return command(argv)
    except UsageError as e:
        err(f"error: {e}")
        return 2
    except weights.WeightsError as e:
        err(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        err("\ninterrupted")
        return 130
    except BrokenPipeError:  # stdout closed early (| head): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


# --- generate ------------------------------------------------------------------------------------------------

def generation_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mlx-crepulse", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Generate a varied batch of images of one prompt with FLUX.1 and contextual "
                            "repulsion; write PNGs (each with its full recipe) and a contact sheet.",
                epilog="other commands:\n"
                       "  mlx-crepulse info FILE.png            print an image's recipe\n"
                       "  mlx-crepulse download NAME [-q 4|8]   fetch FLUX.1 from the Hub (schnell, dev, owner/repo)\n"
                       "  mlx-crepulse convert SOURCE -o DIR    make a loadable (quantized) folder from a folder, "
                       "Hub repo or BFL file\n"
                       "  mlx-crepulse generate PROMPT          the default command, spelled out\n\n"
                       "--diversity D (0..1) maps onto each method's range: contextual scale = lo*(hi/lo)**D over "
                       "the model's\nrecommended range (FLUX: 1e8..5e9); particle scale = D; cads noise = "
                       "0.5*D. 0 = plain seeds.\nstdout: only the paths written. Exit 2: bad input, nothing "
                       "written. Exit 130: interrupted.")
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("-m", "--model", help="demo (default, bundled, offline), schnell, dev, a Hub repo id, or a "
                                         "folder (diffusers layout, or one written by download/convert)")
    p.add_argument("-n", "--n-images", dest="n", type=int, metavar="N", help=f"images in the batch ({DEFAULT_N})")
    p.add_argument("--seed", type=int, help="batch seed; image i gets seed+i (random if not given)")
    p.add_argument("--steps", type=int, help="denoising steps (the model's default: schnell 4, dev 20)")
    p.add_argument("--guidance", type=float, help="embedded guidance of dev models (3.5)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16 (the model's default)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (the model's default)")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), help="quantize the transformer and T5 while loading")
    p.add_argument("--negative-prompt", help="what to avoid (needs --true-cfg above 1)")
    p.add_argument("--true-cfg", type=float, help="true classifier-free guidance scale; 1 = off (two passes a step when on)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (schnell 256, dev 512)")
    p.add_argument("-o", "--output", help=f"folder for the images (./{DEFAULT_OUTPUT}); created if needed")
    p.add_argument("--method", choices=METHODS, help="diversity method: contextual repulsion (default), none "
                                                     "(plain seeds), particle (particle guidance), cads")
    p.add_argument("--diversity", type=float, metavar="D", help=f"0..1, how varied the batch is "
                                                                f"({DEFAULT_DIVERSITY}); 0 = plain seeds")
    p.add_argument("--repulsion-scale", type=float, metavar="ETA", help="contextual repulsion step eta "
                                                                        "(overrides --diversity)")
    p.add_argument("--repulsion-iterations", type=int, metavar="M", help="inner gradient steps (model default 50)")
    p.add_argument("--repulsion-steps", type=int, metavar="TAU", help="denoising steps that repel (model default 1)")
    p.add_argument("--repulsion-blocks", metavar="B", help="all, double, single, or double-block indices "
                                                           "like 0,3,5-9 (all)")
    p.add_argument("--batch-size", type=int, metavar="B", help="generate n images in batches of B (all n at "
                                                               "once); finished batches survive Ctrl-C")
    p.add_argument("--truncate", action="store_true", help="accept cutting a prompt over the model's token "
                                                           "limit (otherwise an error)")
    p.add_argument("--from", dest="from_file", metavar="FILE.png", help="re-run the recipe in FILE.png (its "
                   "whole batch) and write that image again; options given beside it override the recipe")
    p.add_argument("--all", action="store_true", help="with --from: write the whole batch, not only that image")
    p.add_argument("--no-sheet", action="store_true", help="do not write the contact sheet")
    p.add_argument("--low-memory", action="store_true", help="free the text encoders between prompts")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but errors")
    p.add_argument("--version", action="version", version=f"mlx-crepulse {__version__}")
    return p


# Recipe keys that --from takes over, and the option each one corresponds to.
RECIPE_OPTIONS = ("prompt", "n", "seed", "steps", "guidance", "width", "height", "max_sequence_length",
                  "true_cfg", "negative_prompt", "model", "quantize", "batch_size")
METHOD_FLAGS = ("method", "diversity", "repulsion_scale", "repulsion_iterations", "repulsion_steps",
                "repulsion_blocks")


def cmd_generate(argv) -> int:
    args = generation_parser().parse_args(argv)  # --help and --version print on stdout
    paths = _Paths(sys.stdout)
    sys.stdout = sys.stderr  # stray prints from libraries must not mix with the paths on stdout
    try:
        return _generate(args, paths)
    finally:
        sys.stdout = paths.out


def _generate(args, stdout) -> int:
    quiet = args.quiet
    opts = {k: getattr(args, k) for k in RECIPE_OPTIONS}
    recipe_method, index = None, None
    if args.from_file:
        recipe = _read_recipe(args.from_file)
        for key in RECIPE_OPTIONS:  # options given on the command line win over the recipe
            if opts[key] is None:
                opts[key] = recipe.get(key)
        index = recipe.get("index")
        if not any(getattr(args, k) is not None for k in METHOD_FLAGS):
            recipe_method = ("recipe", recipe.get("repulsion"))
    elif args.all:
        raise UsageError("--all goes with --from FILE.png")

    # 1. what can be checked from the arguments alone
    prompt = opts["prompt"]
    if prompt is None:
        raise UsageError('give a prompt, e.g. mlx-crepulse "a red fox in the snow" (see --help)')
    if not prompt.strip():
        raise UsageError("the prompt is empty: describe the image to generate")
    n = DEFAULT_N if opts["n"] is None else opts["n"]
    if n < 1:
        raise UsageError(f"-n/--n-images must be 1 or more, not {n}")
    for name in ("width", "height"):
        v = opts[name]
        if v is not None and (v < SIZE_MULTIPLE or v % SIZE_MULTIPLE):
            raise UsageError(f"--{name} {v} is not a multiple of {SIZE_MULTIPLE} (try "
                             f"{max(SIZE_MULTIPLE, round(v / SIZE_MULTIPLE) * SIZE_MULTIPLE)})")
    for name, v in (("--steps", opts["steps"]), ("--batch-size", opts["batch_size"]),
                    ("--max-sequence-length", opts["max_sequence_length"])):
        if v is not None and v < 1:
            raise UsageError(f"{name} must be 1 or more, not {v}")
    if opts["true_cfg"] is not None and opts["true_cfg"] < 1:
        raise UsageError(f"--true-cfg must be 1 (off) or more, not {opts['true_cfg']}")
    if args.negative_prompt is not None and (opts["true_cfg"] or 1) <= 1 and not quiet:
        err("warning: --negative-prompt has no effect without --true-cfg above 1")
    method_spec = recipe_method or _method_spec(args, n, opts["batch_size"])
    seed = opts["seed"] if opts["seed"] is not None else random.SystemRandom().randrange(2**31 - 1 - n)
    output = Path(args.output or DEFAULT_OUTPUT)
    _check_writable(output)
    quantize = opts["quantize"]
    if quantize not in (None, 4, 8):
        raise UsageError(f"quantize must be 4 or 8 (bits), not {quantize}")

    # 2. the model's files, and what its tokenizer and config say about the prompt
    source = _model_source(opts["model"] or "demo")
    folder = weights.resolve(source, progress=not quiet)
    defaults = _defaults(folder)
    max_len = opts["max_sequence_length"] or defaults.max_sequence_length
    negative = opts["negative_prompt"] if (opts["true_cfg"] or defaults.true_cfg) > 1 else None
    _check_tokens(folder, prompt, negative, max_len, args.truncate, quiet)

    # 3. load and run
    if not quiet:
        err(f"loading {source}" + (f" ({quantize}-bit)" if quantize else "") + " ...")
    from .pipeline import Cancelled, Pipeline
    from .repulsion import CADS

    started = time.perf_counter()
    try:
        pipe = Pipeline.from_pretrained(source, quantize=quantize, low_memory=args.low_memory, progress=not quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    method = _build_method(method_spec, pipe.defaults, opts, seed)
    width, height = opts["width"] or pipe.defaults.width, opts["height"] or pipe.defaults.height
    batches = _batches(n, opts["batch_size"], method is not None)
    wanted = None if (args.all or index is None or not args.from_file) else index
    if wanted is not None and wanted >= n:
        raise UsageError(f"{args.from_file} is image {wanted} of its batch; -n {n} does not reach it")
    stop = _Interrupt()
    bar = _Bar(len(batches), quiet)
    written, done_images, first_settings = [], [], None
    slug = _slug(prompt)
    interrupted = False
    with stop:
        for b, (offset, size) in enumerate(batches):
            if stop.requested:
                interrupted = True
                break
            bar.batch = b
            batch_method = method
            if isinstance(method, CADS) and offset:  # fresh condition noise for each batch, as image seeds
                batch_method = dataclasses.replace(method, seed=method.seed + offset)
            try:
                result = pipe.generate(prompt, n=size, seed=seed + offset, steps=opts["steps"],
                                       guidance=opts["guidance"], width=width, height=height,
                                       max_sequence_length=max_len, repulsion=batch_method,
                                       negative_prompt=opts["negative_prompt"], true_cfg=opts["true_cfg"],
                                       callback=lambda p: bar(p) and not stop.requested)
            except Cancelled:
                interrupted = True
                break
            except ValueError as e:
                raise UsageError(str(e)) from e
            finally:
                bar.end()
            first_settings = first_settings or result.settings
            for i, image in enumerate(result.images):
                if wanted is not None and i != wanted:
                    continue
                recipe = dict(result.settings, index=i, image_seed=result.seeds[i])
                output.mkdir(parents=True, exist_ok=True)
                path = metadata.write_png(output / f"{slug}-{seed}-{offset + i}.png", image, recipe, overwrite=False)
                stdout.emit(path)
                written.append(path)
                done_images.append(image)
        interrupted = interrupted or stop.requested  # Ctrl-C during the last decode: images kept, still 130
    if len(done_images) > 1 and not args.no_sheet:
        sheet_recipe = dict(first_settings, n=len(done_images), index=None, image_seed=None)
        if len(batches) > 1:
            sheet_recipe["batch_size"] = batches[0][1]
        path = metadata.write_png(output / f"{slug}-{seed}-sheet.png", contact_sheet(done_images), sheet_recipe,
                                  overwrite=False)
        stdout.emit(path)
    if interrupted:
        err(f"interrupted: kept {len(written)} finished image(s)" if written else "interrupted: no image finished")
        return 130
    if not quiet:
        err(f"wrote {len(written)} image(s) to {output} in {time.perf_counter() - started:.1f}s")
    return 0


def _read_recipe(path) -> dict:
    try:
        recipe = metadata.read_png(path)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if recipe.get("blend"):
        raise UsageError(f"{path} was made from recorded contexts (the app's blend or variation of a favourite), "
                         "which the command line cannot re-run")
    if recipe.get("strength") is not None:
        raise UsageError(f"{path} was made from an input image (image to image), which is not in the file")
    try:
        metadata.method_from_dict(recipe.get("repulsion"))
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from e
    return recipe


def _method_spec(args, n, batch_size):
    """Check the diversity flags against each other (before any loading); the method is built once the
    model's defaults are known."""
    explicit = any(getattr(args, k) is not None for k in METHOD_FLAGS)
    method = args.method or "contextual"
    d = DEFAULT_DIVERSITY if args.diversity is None else args.diversity
    if not 0 <= d <= 1:
        raise UsageError(f"--diversity must be between 0 and 1, not {d}")
    specific = [f"--{k.replace('_', '-')}" for k in METHOD_FLAGS[2:] if getattr(args, k) is not None]
    if specific and method != "contextual":
        raise UsageError(f"{', '.join(specific)} applies to --method contextual, not {method}")
    for name in ("repulsion_scale", "repulsion_iterations"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "repulsion_scale" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be {'0' if name == 'repulsion_scale' else '1'} "
                             f"or more, not {v}")
    if args.repulsion_steps is not None and args.repulsion_steps < 0:
        raise UsageError(f"--repulsion-steps must be 0 or more, not {args.repulsion_steps}")
    blocks = _parse_blocks(args.repulsion_blocks) if args.repulsion_blocks is not None else "all"
    active = method != "none" and (d > 0 or args.repulsion_scale is not None)
    if active and min(n, batch_size or n) < 2:
        if explicit:
            raise UsageError(f"--method {method} pushes the images of a batch apart: it needs 2 or more "
                             f"images a batch (-n{' and --batch-size' if batch_size else ''})")
        active = False  # one image alone: plain seeds, nothing to push apart
    if not active:
        return ("none", None)
    return (method, dict(diversity=d, scale=args.repulsion_scale, iterations=args.repulsion_iterations,
                         steps=args.repulsion_steps, blocks=blocks))


def _parse_blocks(text):
    text = text.strip()
    if text in ("all", "double", "single"):
        return text
    out = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    except ValueError:
        raise UsageError(f"--repulsion-blocks {text!r}: use all, double, single, or double-block indices "
                         "like 0,3,5-9") from None
    if not out:
        raise UsageError("--repulsion-blocks lists no block")
    return sorted(set(out))


def _build_method(spec, defaults, opts, seed):
    """The diversity method object: from a recipe's dict, or from --method/--diversity/--repulsion-*."""
    from .repulsion import CADS, ParticleGuidance

    kind, s = spec
    if kind == "recipe":
        return metadata.method_from_dict(s)
    if kind == "none":
        return None
    d = s["diversity"]
    if kind == "contextual":
        given = {k: s[k] for k in ("scale", "iterations", "steps") if s[k] is not None}
        return defaults.repulsion(d, blocks=s["blocks"], **given)
    width, height = opts["width"] or defaults.width, opts["height"] or defaults.height
    if kind == "particle":
        return ParticleGuidance(scale=float(f"{d * PARTICLE_SCALE:.3g}"))
    return CADS(noise_scale=round(d * CADS_MAX_NOISE, 4), seed=seed)


def _batches(n, batch_size, repelling):
    """(offset, size) of each batch. A last batch of one image joins the one before when a method
    needs two or more images a batch."""
    b = batch_size or n
    out = [(o, min(b, n - o)) for o in range(0, n, b)]
    if repelling and len(out) > 1 and out[-1][1] == 1:
        out[-2:] = [(out[-2][0], out[-2][1] + 1)]
    return out


def _model_source(model: str) -> str:
    """Existing folders become absolute paths, so that a recipe names them wherever it is re-run."""
    if model == "demo" or model in weights.ALIASES:  # names first, as weights.resolve reads them
        return model
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"model folder {model} does not exist")
    return model


def _defaults(folder: Path):
    from .pipeline import Defaults

    return Defaults.for_model(folder, weights.read_json(folder / "transformer" / "config.json"))


def _check_tokens(folder, prompt, negative, max_len, truncate, quiet):
    """A prompt longer than the T5 limit would be cut silently (as diffusers does): refuse unless
    --truncate, and then say how much was cut."""
    count_tokens = token_counter(folder)
    for what, text in (("prompt", prompt), ("negative prompt", negative)):
        if not text:
            continue
        count = count_tokens(text)
        if count <= max_len:
            continue
        over = count - max_len
        if not truncate:
            raise UsageError(f"the {what} is {count} T5 tokens, {over} over this model's limit of {max_len}; "
                             f"shorten it, or pass --truncate to cut the last {over}")
        if not quiet:
            err(f"warning: the {what} is {count} T5 tokens; cut {over} to fit the limit of {max_len}")


def token_counter(folder: Path):
    """T5 tokens of a text, end token included, as `Pipeline.token_count` counts them, but before any
    weights are loaded."""
    return Tokenizer(folder / "tokenizer_2").count


def _check_writable(folder: Path):
    """The output folder, or the nearest existing folder above it, must take a new file; nothing is
    left behind by the check (the folder itself is made only when the first image is written)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"the output {folder} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write to the output folder {folder}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".crepulse-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {folder}: {e.strerror or e}") from None


def _slug(prompt: str, limit: int = 48) -> str:
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode().lower()
    s = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if len(s) > limit:
        s = s[:limit].rsplit("-", 1)[0] or s[:limit]
    return s or "image"


def contact_sheet(images, columns=None, gap=4):
    """A grid of the batch: tiles scaled to a whole factor (nearest) to at least 256 px when small,
    down to at most 512 px when large; columns ~ sqrt(n)."""
    from PIL import Image

    w, h = images[0].size
    side = max(w, h)
    if side < SHEET_TILE[0]:
        f = math.ceil(SHEET_TILE[0] / side)
        tw, th, resample = w * f, h * f, Image.Resampling.NEAREST
    elif side > SHEET_TILE[1]:
        f = SHEET_TILE[1] / side
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


class _Bar:
    """One line on stderr, redrawn after each step: `step 3/8 [#####.....] 4 images  2.1s  eta 3.2s`."""

    def __init__(self, batches, quiet):
        self.batches, self.quiet, self.batch, self.drawn = batches, quiet, 0, False

    def __call__(self, p) -> bool:
        if self.quiet:
            return True
        filled = round(20 * p.step / p.steps)
        per_batch = p.elapsed / p.step * p.steps if p.step else 0.0
        eta = p.eta + per_batch * (self.batches - 1 - self.batch)
        prefix = f"batch {self.batch + 1}/{self.batches} " if self.batches > 1 else ""
        line = (f"{prefix}step {p.step}/{p.steps} [{'#' * filled}{'.' * (20 - filled)}] {p.n} image"
                f"{'s' if p.n != 1 else ''}  {p.elapsed:.1f}s  eta {eta:.1f}s")
        err(f"\r{line:<72}", end="")
        self.drawn = True
        return True

    def end(self):
        if self.drawn:
            err("")
            self.drawn = False


class _Interrupt:
    """Within the block, the first Ctrl-C asks to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            err("\nstopping after this step (Ctrl-C again to stop at once)")
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _Paths:
    """stdout: the paths written, one a line, flushed at once; a closed pipe stops the printing only."""

    def __init__(self, out):
        self.out, self.closed = out, False

    def emit(self, path):
        if self.closed:
            return
        try:
            print(path, file=self.out, flush=True)
        except BrokenPipeError:
            self.closed = True
            try:  # keep the interpreter from complaining about the closed pipe at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            except (OSError, ValueError):
                pass


# --- info ------------------------------------------------------------------------------------------------------

def cmd_info(argv) -> int:
    p = _Parser(prog="mlx-crepulse info", description="Print the recipe stored in PNG files written by "
                                                      "mlx-crepulse: the AUTOMATIC1111 parameters, then the JSON.")
    p.add_argument("files", nargs="+", metavar="FILE.png")
    p.add_argument("--json", action="store_true", help="only the JSON recipe (a list for several files)")
    args = p.parse_args(argv)
    recipes = []
    for f in args.files:
        try:
            recipes.append(metadata.read_png(f))
        except ValueError as e:
            raise UsageError(str(e)) from e
    if args.json:
        print(json.dumps(recipes[0] if len(recipes) == 1 else recipes, indent=2, ensure_ascii=False))
        return 0
    for i, (f, r) in enumerate(zip(args.files, recipes)):
        if len(recipes) > 1:
            print(("\n" if i else "") + f"== {f}")
        print(metadata.a1111_parameters(r))
        print()
        print(json.dumps(r, indent=2, ensure_ascii=False))
    return 0


# --- download and convert -------------------------------------------------------------------------------------

def cmd_download(argv) -> int:
    p = _Parser(prog="mlx-crepulse download",
                description="Fetch a FLUX.1 pipeline from the Hugging Face Hub into its cache (only the files a "
                            "pipeline needs). With -q or -o, also write a folder (quantized with -q) that "
                            "--model loads directly. Prints the folder to use.")
    p.add_argument("name", help="schnell, dev, or a Hub repo id (owner/name)")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), help="quantize the transformer and T5")
    p.add_argument("-o", "--output", help="folder to write (default with -q: ./<repo>-<bits>bit)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    repo = weights.ALIASES.get(args.name, args.name)
    if Path(args.name).expanduser().exists():
        raise UsageError(f"{args.name} is a local path: use `mlx-crepulse convert {args.name} -o FOLDER`")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UsageError(f"unknown model {args.name!r}: use schnell, dev or a Hub repo id (owner/name)")
    out = None
    if args.quantize or args.output:
        out = Path(args.output).expanduser() if args.output else Path(f"{repo.split('/')[-1]}-{args.quantize}bit")
        _check_new_folder(out)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not args.quiet and not offline:
        err(f"downloading {repo} ...")
    try:
        snapshot = Path(weights.download(repo, progress=not args.quiet))
    except weights.WeightsError as e:
        if offline:
            raise UsageError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: unset it "
                             "to download") from e
        raise
    if out is None:
        print(snapshot, flush=True)
        return 0
    _save(str(snapshot), out, args.quantize, args.quiet)
    return 0


def cmd_convert(argv) -> int:
    p = _Parser(prog="mlx-crepulse convert",
                description="Write a folder that --model loads directly, quantized with -q, from a diffusers "
                            "folder or Hub repo, or from a BFL single-file transformer (flux1-*.safetensors) "
                            "with the rest of the pipeline (text encoders, VAE, tokenizers) from --base.")
    p.add_argument("source", help="a diffusers-layout folder, schnell/dev/a Hub repo id, or a BFL .safetensors file")
    p.add_argument("-o", "--output", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), help="quantize the transformer and T5")
    p.add_argument("--transformer", metavar="FILE.safetensors", help="a BFL single-file transformer replacing "
                                                                    "SOURCE's transformer")
    p.add_argument("--base", help="with a BFL file as SOURCE: the pipeline it completes (default: dev if the "
                                  "file has a guidance embedding, else schnell)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.output).expanduser()
    _check_new_folder(out)
    source = Path(args.source).expanduser()
    if source.is_file():
        if args.transformer:
            raise UsageError("give the BFL file either as SOURCE or with --transformer, not both")
        bfl, base = source, args.base
    else:
        if args.base:
            raise UsageError("--base goes with a BFL file as SOURCE; with a folder, use --transformer FILE")
        bfl, base = (Path(args.transformer).expanduser() if args.transformer else None), args.source
    if bfl is not None:
        keys = _safetensors_keys(bfl)
        if base is None:
            base = "dev" if any(k.split(".")[0] == "guidance_in" or ".guidance_in." in k
                                or "guidance_embedder" in k for k in keys) else "schnell"
    base = _model_source(base)
    base_folder = weights.resolve(base, progress=not args.quiet)
    if bfl is None:
        _save(str(base_folder), out, args.quantize, args.quiet)
        return 0
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.resolve().parent))
    try:
        for entry in base_folder.iterdir():
            if entry.name != "transformer":
                (staging / entry.name).symlink_to(entry.resolve())
        (staging / "transformer").mkdir()
        shutil.copy2(base_folder / "transformer" / "config.json", staging / "transformer" / "config.json")
        (staging / "transformer" / "diffusion_pytorch_model.safetensors").symlink_to(bfl.resolve())
        _save(str(staging), out, args.quantize, args.quiet)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return 0


def _safetensors_keys(path: Path) -> list:
    """Tensor names from a safetensors header (8-byte length, then JSON), without reading the tensors."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 30:
                raise ValueError("bad header length")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable .safetensors file ({e})") from None
    return [k for k in header if k != "__metadata__"]


def _check_new_folder(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty; choose a new folder")
    _check_writable(out.parent if out.parent != out else Path("."))


def _save(source: str, out: Path, quantize, quiet):
    """Load (quantizing while loading) and write the folder under a hidden name, then move it into
    place, so a folder that exists is always complete."""
    from .pipeline import Pipeline

    if not quiet:
        err(f"loading {source}" + (f" and quantizing to {quantize} bits" if quantize else "") + " ...")
    try:
        pipe = Pipeline.from_pretrained(source, quantize=quantize, progress=not quiet)
    except ValueError as e:
        raise UsageError(str(e)) from e
    out = out.expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private; the folder is an ordinary one
    try:
        if not quiet:
            err(f"writing {out} ...")
        pipe.save(partial)
        if out.exists():
            out.rmdir()  # empty, checked before
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    print(out, flush=True)
