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

Files: `<output>/<prompt-slug>-<seed>-<i>.png` and `<prompt-slug>-<seed>-sheet.png` (the contact
sheet); an existing file is never replaced ("-1", "-2", ... is added), each is written whole or not
at all, and each carries its batch's recipe. `--from FILE.png` re-runs the image's whole batch
(repulsion couples the images) and writes image i (`--all`: the batch); options beside it override
the recipe. What the options mean, the method and the diversity knob included, is `Recipe`'s (recipe.py):
this module only maps arguments onto one and writes what the pipeline makes.
"""

import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from . import lora, memory, metadata, weights
from .cli_args import DEFAULT_OUTPUT, UsageError, generation_parser, loras_from_args, recipe_from_args
from .cli_output import _Bar, _Interrupt, _Paths, err
from .model_folder import ModelFolder
from .pipeline import Cancelled, NotFinite, Pipeline
from .recipe import Recipe, RecipeError
from .repulsion import CADS
from .sheet import contact_sheet

SUBCOMMANDS = ("generate", "info", "download", "convert")


# --- entry point ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .cli_models import cmd_convert, cmd_download, cmd_info
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

def cmd_generate(argv) -> int:
    args = generation_parser().parse_args(argv)  # --help and --version print on stdout
    paths = _Paths(sys.stdout)
    sys.stdout = sys.stderr  # stray prints from libraries must not mix with the paths on stdout
    try:
        return _generate(args, paths)
    except (RecipeError, NotFinite) as e:
        raise UsageError(str(e)) from None
    finally:
        sys.stdout = paths.out


def _generate(args, stdout) -> int:
    """Arguments -> a Recipe, checked against the model's files before any weights are read; then
    the batches, each image written as it is made."""
    base, index = _read_recipe(args.from_file) if args.from_file else (None, None)
    if args.all and not args.from_file:
        raise UsageError("--all goes with --from FILE.png")
    recipe = recipe_from_args(args, base)
    loras = lora.read_all(loras_from_args(args, base))  # every LoRA file read and checked before the weights
    output = Path(args.output or DEFAULT_OUTPUT)
    check_writable(output)
    files = ModelFolder.open(recipe.model, progress=not args.quiet)
    memory.check_files(files, recipe.quantize, args.low_memory, args.force)  # the weights, before reading them
    resolved = files.resolve(recipe, recipe.quantize, force=args.force)
    if recipe.negative_prompt and resolved.true_cfg <= 1:
        _say(args, "warning: --negative-prompt has no effect with true CFG off: pass --true-cfg above 1")
    _check_tokens(files, resolved, args.truncate, args.quiet)
    unknown = files.unknown_words(resolved.prompt)
    if unknown:
        _say(args, f"warning: this model knows only {' '.join(files.vocabulary)}; new to it: {' '.join(unknown)}"
                   + (f" (try \"{files.example_prompt}\")" if files.example_prompt else ""))
    wanted = None if (args.all or index is None) else index
    if wanted is not None and wanted >= resolved.n:
        raise UsageError(f"{args.from_file} is image {wanted} of its batch; -n {resolved.n} does not reach it")
    batches = _batches(resolved.n, args.batch_size, resolved.method is not None)

    _say(args, f"loading {recipe.model}" + (f" ({recipe.quantize}-bit)" if recipe.quantize else "") + " ...")
    started = time.perf_counter()
    with _Interrupt() as stop:
        pipe = Pipeline.load(files, quantize=recipe.quantize, low_memory=args.low_memory)
        if loras:
            pipe.set_loras(loras)
        written, images, interrupted = _run_batches(pipe, resolved, batches, wanted, output, stdout, args.quiet, stop)
    if len(images) > 1 and not args.no_sheet:
        sheet = dict(resolved.to_dict(), index=None, image_seed=None)
        if len(batches) > 1:
            sheet["batch_size"] = batches[0][1]
        slug = metadata.slug(resolved.prompt)
        try:
            stdout.emit(metadata.write_png(output / f"{slug}-{resolved.seed}-sheet.png", contact_sheet(images), sheet,
                                           overwrite=False))
        except OSError as e:
            raise UsageError(f"cannot write the contact sheet to {output}: {e.strerror or e}; kept the "
                             f"{len(written)} image(s)") from None
    if interrupted:
        err(f"interrupted: kept {len(written)} finished image(s)" if written else "interrupted: no image finished")
        return 130
    _say(args, f"wrote {len(written)} image(s) to {output} in {time.perf_counter() - started:.1f}s")
    return 0


def _run_batches(pipe, recipe, batches, wanted, output, stdout, quiet, stop):
    """Generate each batch of the resolved recipe and write its images; Ctrl-C keeps finished ones."""
    bar = _Bar(len(batches), quiet)
    written, images, interrupted = [], [], False
    for b, (offset, size) in enumerate(batches):
        if stop.requested:
            break
        bar.batch = b
        method = recipe.method
        if isinstance(method, CADS) and offset:  # fresh condition noise for each batch, as image seeds
            method = replace(method, seed=method.seed + offset)
        batch = replace(recipe, n=size, seed=recipe.seed + offset, method=method)
        try:
            result = pipe.generate(batch, callback=lambda p: bar(p) and not stop.requested)
        except Cancelled:
            interrupted = True
            break
        finally:
            bar.end()
        for i, image in enumerate(result.images):
            if wanted is None or i == wanted:
                try:
                    path = _write(output, result, i, offset, recipe)
                except OSError as e:  # a full disk, a folder gone: what was written stays, whole
                    raise UsageError(f"cannot write to {output}: {e.strerror or e}; kept the {len(written)} "
                                     "image(s) written before") from None
                stdout.emit(path)
                written.append(path)
                images.append(image)
    return written, images, interrupted or stop.requested


def _write(output: Path, result, i: int, offset: int, recipe: Recipe) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    chunk = dict(result.recipe.to_dict(), index=i, image_seed=result.seeds[i])
    name = f"{metadata.slug(recipe.prompt)}-{recipe.seed}-{offset + i}.png"
    return metadata.write_png(output / name, result.images[i], chunk, overwrite=False)


def _read_recipe(path):
    """A --from file's Recipe (the whole batch; a sheet's `batch_size` is kept by --batch-size) and
    which image of the batch it is (None for a sheet)."""
    try:
        d = metadata.read_png(path)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if d.get("blend"):
        raise UsageError(f"{path} was made from recorded contexts (the app's blend or variation of a favourite), "
                         "which the command line cannot re-run")
    if d.get("strength") is not None:
        raise UsageError(f"{path} was made from an input image (image to image), which is not in the file")
    try:
        recipe = Recipe.from_dict(d)
    except RecipeError as e:
        raise UsageError(f"{path}: {e}") from e
    index = d.get("index")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < recipe.n):
        raise UsageError(f"{path}: its recipe's index {index!r} is not an image of its batch of {recipe.n}")
    return recipe, index


def _batches(n, batch_size, repelling):
    """(offset, size) of each batch. A last batch of one image joins the one before when a method
    needs two or more images a batch."""
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be 1 or more, not {batch_size}")
    b = batch_size or n
    out = [(o, min(b, n - o)) for o in range(0, n, b)]
    if repelling and len(out) > 1 and out[-1][1] == 1:
        out[-2:] = [(out[-2][0], out[-2][1] + 1)]
    if repelling and out[0][1] < 2:
        raise UsageError("the diversity method pushes the images of a batch apart: it needs --batch-size 2 or more")
    return out


def _check_tokens(files, recipe, truncate, quiet):
    """A prompt longer than the T5 limit would be cut silently (as diffusers does): refuse unless
    --truncate, and then say how much was cut."""
    for what, count, limit in files.token_overflow(recipe):
        over = count - limit
        if not truncate:
            raise UsageError(f"the {what} is {count} T5 tokens, {over} over this model's limit of {limit}; "
                             f"shorten it, or pass --truncate to cut the last {over}")
        if not quiet:
            err(f"warning: the {what} is {count} T5 tokens; cut {over} to fit the limit of {limit}")


def check_writable(folder: Path):
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


def _say(args, text):
    if not args.quiet:
        err(text)
