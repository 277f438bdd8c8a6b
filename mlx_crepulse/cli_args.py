"""The command line's arguments and the Recipe they ask for (`recipe_from_args`)."""

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Optional

from . import weights
from .recipe import DEFAULT_DIVERSITY, Recipe
from .repulsion import Repulsion
from .version import __version__

METHODS = ("none", "contextual", "particle", "cads")
DEFAULT_OUTPUT = "out"
DEFAULT_N = 4


class UsageError(Exception):
    """Bad input: printed as one line `error: ...`, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


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
    p.add_argument("-m", "--model", help="demo (default, bundled, offline), klein, klein-base, klein-9b, "
                                         "klein-9b-base, schnell, dev, a Hub repo id, or a folder (diffusers "
                                         "layout, or one written by download/convert)")
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
    p.add_argument("--repulsion-steps", type=int, metavar="TAU", help="denoising steps that repel (the model's "
                                                                      "default: FLUX.1 1, the demo 3)")
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
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help="a LoRA (a .safetensors file or a Hub "
                   "file owner/name:file.safetensors) at a scale (1); repeat for several")
    p.add_argument("--force", action="store_true", help="run even when the memory estimate says it will not fit")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but errors")
    p.add_argument("--version", action="version", version=f"mlx-crepulse {__version__}")
    return p


# Options that set a Recipe field of the same name; --from takes the rest from the file.
RECIPE_OPTIONS = ("prompt", "n", "seed", "steps", "guidance", "width", "height", "max_sequence_length",
                  "true_cfg", "negative_prompt", "model", "quantize")
REPULSION_OPTIONS = ("repulsion_scale", "repulsion_iterations", "repulsion_steps", "repulsion_blocks")


def recipe_from_args(args, base: Optional[Recipe] = None) -> Recipe:
    """The Recipe the arguments ask for: the options given, over `base` (a --from file's recipe) or
    over the model's defaults; the method from --method/--diversity/--repulsion-*."""
    given = {k: getattr(args, k) for k in RECIPE_OPTIONS if getattr(args, k) is not None}
    if "model" in given:
        given["model"] = model_source(given["model"])
    method = _method_from_args(args)
    if base is not None:
        if method is not None or args.diversity is not None:
            given.update(method=method, diversity=args.diversity)
        if args.batch_size and "n" not in given:
            given["n"] = base.n
        return replace(base, **given)
    if "prompt" not in given:
        raise UsageError('give a prompt, e.g. mlx-crepulse "a red fox in the snow" (see --help)')
    return Recipe(**{"n": DEFAULT_N, **given}, method=method,
                  diversity=DEFAULT_DIVERSITY if args.diversity is None else args.diversity)


def loras_from_args(args, base: Optional[Recipe] = None) -> list:
    """The LoRAs to apply: --lora's (reference, scale) pairs, else a --from recipe's recorded ones (their
    files checked against the recorded SHA-256 before any work)."""
    from . import lora
    if args.lora:
        try:
            return [lora.parse_arg(text) for text in args.lora]
        except ValueError as e:
            raise UsageError(str(e)) from None
    if base is not None and base.loras:
        lora.verify(list(base.loras))
        return list(base.loras)
    return []


def _method_from_args(args):
    """A method name, a Repulsion (its unset fields the model's) or None (the diversity knob alone)."""
    exact = [f"--{k.replace('_', '-')}" for k in REPULSION_OPTIONS if getattr(args, k) is not None]
    if exact and args.method not in (None, "contextual"):
        raise UsageError(f"{', '.join(exact)} applies to --method contextual, not {args.method}")
    if exact:
        blocks = _parse_blocks(args.repulsion_blocks) if args.repulsion_blocks is not None else "all"
        return Repulsion(scale=args.repulsion_scale, iterations=args.repulsion_iterations,
                         repelled_steps=args.repulsion_steps, blocks=blocks)
    return args.method


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


def model_source(model: str) -> str:
    """Existing folders become absolute paths, so that a recipe names them wherever it is re-run."""
    if model == "demo" or model in weights.ALIASES:  # names first, as weights.resolve reads them
        return model
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UsageError(f"model folder {model} does not exist")
    return model
