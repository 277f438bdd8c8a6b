"""The command line's model and file commands: `info`, `download` and `convert` (see cli.py)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import hub, metadata, weights
from .cli import check_writable
from .cli_args import UsageError, _Parser, model_source
from .cli_output import err
from .recipe import migrate


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
        print(metadata.a1111_parameters(migrate(r)))
        print()
        print(json.dumps(r, indent=2, ensure_ascii=False))
    return 0


# --- download and convert -------------------------------------------------------------------------------------

def cmd_download(argv) -> int:
    p = _Parser(prog="mlx-crepulse download",
                description="Fetch a FLUX.1 or FLUX.2 [klein] pipeline from the Hugging Face Hub into its cache (only the files a "
                            "pipeline needs). With -q or -o, also write a folder (quantized with -q) that "
                            "--model loads directly. Prints the folder to use.")
    p.add_argument("name", help=f"{', '.join(weights.ALIASES)}, or a Hub repo id (owner/name)")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), help="quantize the transformer and T5")
    p.add_argument("-o", "--output", help="folder to write (default with -q: ./<repo>-<bits>bit)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    repo = weights.ALIASES.get(args.name, args.name)
    if Path(args.name).expanduser().exists():
        raise UsageError(f"{args.name} is a local path: use `mlx-crepulse convert {args.name} -o FOLDER`")
    if not weights.is_repo_id(repo):
        raise UsageError(f"unknown model {args.name!r}: use {', '.join(weights.ALIASES)} or a Hub repo id (owner/name)")
    out = None
    if args.quantize or args.output:
        out = Path(args.output).expanduser() if args.output else Path(f"{repo.split('/')[-1]}-{args.quantize}bit")
        _check_new_folder(out)
    offline = weights.hub_offline()
    if not offline:
        _check_disk(repo)
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


def _check_disk(repo: str):
    """Refuse before fetching anything when the disk cannot hold what is left of `repo` to fetch."""
    total = hub.known_download_size(repo)
    problem = total is not None and hub.disk_problem(repo, total)
    if problem:
        raise UsageError(f"{problem}: free some space, or set HF_HOME to a folder on a bigger disk")


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
    if source.suffix == ".safetensors" and not source.exists():
        raise UsageError(f"{source} does not exist: give the path of a BFL .safetensors file, or a folder or Hub id")
    if source.is_file():
        if args.transformer:
            raise UsageError("give the BFL file either as SOURCE or with --transformer, not both")
        bfl, base = source, args.base
    else:
        if args.base:
            raise UsageError("--base goes with a BFL file as SOURCE; with a folder, use --transformer FILE")
        bfl, base = (Path(args.transformer).expanduser() if args.transformer else None), args.source
    if bfl is not None:
        if not bfl.is_file():
            raise UsageError(f"the transformer file {bfl} does not exist")
        keys = weights.safetensors_keys(bfl)
        if not weights.is_bfl(keys):
            raise UsageError(f"{bfl} is not a BFL single-file FLUX.1 transformer (flux1-*.safetensors)")
        if base is None:
            base = "dev" if weights.has_guidance_embedding(keys) else "schnell"
    base = model_source(base)
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


def _check_new_folder(out: Path):
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty; choose a new folder")
    check_writable(out.parent if out.parent != out else Path("."))


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
