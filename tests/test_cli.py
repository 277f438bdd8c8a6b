"""The command line, run for real: `python -m mlx_crepulse ...` as a subprocess, on the demo model.

Until the bundled demo model exists, the tiny random pipeline of tests/tiny.py stands in for it
(`model_arg`); set USE_DEMO to force one or the other. Every subprocess runs offline
(HF_HUB_OFFLINE=1, an empty Hugging Face cache) in a fresh folder.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_crepulse
from mlx_crepulse import CADS, Defaults, ParticleGuidance, Recipe, Repulsion, cli, metadata
from mlx_crepulse.recipe import method_from_dict, method_to_dict
from mlx_crepulse.weights import DEMO_DIR

ROOT = Path(__file__).resolve().parent.parent
USE_DEMO = None  # None: the demo model when it is there, else the tiny one; True / False to force
PROMPT = "a red fox"  # fits every model's token limit, the demo's 8 included
LONG_PROMPT = " ".join(["a red fox in the snow beside a frozen lake under the stars"] * 70)  # > 512 T5 tokens


@pytest.fixture(scope="session")
def model_arg(request):
    """What --model gets: "demo", or the tiny schnell-like folder while the demo model is not there."""
    use_demo = (DEMO_DIR / "model_index.json").exists() if USE_DEMO is None else USE_DEMO
    return "demo" if use_demo else str(request.getfixturevalue("schnell_dir"))


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-home")


def cli_env(hf_home, **env):
    return dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(hf_home),
                TOKENIZERS_PARALLELISM="false", **env)


class Job:
    """One run of the command, started at once in the background; `wait()` gives its CompletedProcess.
    Independent runs overlap, so the whole file stays fast on two cores. With `interrupt_when`, the
    run gets a SIGINT (Ctrl-C) as soon as that text shows on its stderr."""

    def __init__(self, args, cwd, hf_home, interrupt_when=None, **env):
        self.cwd, self.before, self._result = Path(cwd), files_under(cwd), None
        self.args = [sys.executable, "-m", "mlx_crepulse", *map(str, args)]
        self.proc = subprocess.Popen(self.args, cwd=cwd, env=cli_env(hf_home, **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.out, self.err, self.interrupted = bytearray(), bytearray(), False
        self._threads = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out, None)),
                         threading.Thread(target=self._read, args=(self.proc.stderr, self.err, interrupt_when))]
        for t in self._threads:
            t.start()

    def _read(self, stream, buf, interrupt_when):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.extend(chunk)
            if interrupt_when and not self.interrupted and interrupt_when.encode() in buf:
                self.interrupted = True
                self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout=300) -> subprocess.CompletedProcess:
        if self._result is None:
            self.proc.wait(timeout=timeout)
            for t in self._threads:
                t.join()
            self._result = subprocess.CompletedProcess(self.args, self.proc.returncode, self.out.decode(),
                                                       self.err.decode())
        return self._result


def run(args, cwd, hf_home, timeout=300, **env):
    return Job(args, cwd, hf_home, **env).wait(timeout)


def files_under(folder: Path) -> set:
    return {p.relative_to(folder) for p in Path(folder).rglob("*")}


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


# --- the runs, started together --------------------------------------------------------------------------------

BAD = {
    "empty prompt": (["   "], "the prompt is empty"),
    "no prompt": ([], "give a prompt"),
    "n < 1": ([PROMPT, "-n", "0"], "n must be 1 to 4096, not 0"),
    "size": ([PROMPT, "--width", "40"], "width 40 must be a multiple of 16 (try 32)"),
    "unknown model": ([PROMPT, "--model", "nonsense"], "unknown model 'nonsense'"),
    "missing folder": ([PROMPT, "--model", "./no/such/folder"], "model folder ./no/such/folder does not exist"),
    "offline": ([PROMPT, "--model", "schnell"], "`python -m mlx_crepulse download schnell`"),
    "unwritable output": ([PROMPT, "-o", "a-file/pics"], "cannot write to the output folder a-file/pics"),
    "too long prompt": ([LONG_PROMPT], "error: the prompt is ", "over this model's limit of", "--truncate"),
    "diversity range": ([PROMPT, "--diversity", "1.5"], "diversity must be between 0 and 1, not 1.5"),
    "method flags": ([PROMPT, "--method", "cads", "--repulsion-scale", "1e8"], "applies to --method contextual"),
    "repulsion of one": ([PROMPT, "-n", "1", "--method", "contextual"], "needs a batch of at least 2 images"),
    "bad option": ([PROMPT, "--steps", "many"], "invalid int value: 'many'"),
    "from a non-recipe": (["--from", "a-file"], "cannot read a-file"),
    "from a blend": (["--from", "blend.png"], "blend.png was made from recorded contexts", "cannot re-run"),
    "info a non-recipe": (["info", "a-file"], "cannot read a-file"),
    "download offline": (["download", "dev"], "FLUX.1-dev is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    # the Recipe's own checks, one per field (issue 18: each was a traceback or a crash after the work)
    "seed below -1": ([PROMPT, "--seed", "-2"], "seed must be -1 (random) or 0 to"),
    "seed past 2**64": ([PROMPT, "--seed", str(2**64 - 1), "-n", "2"], "seed must be -1 (random) or 0 to"),
    "guidance nan": ([PROMPT, "--guidance", "nan"], "guidance must be a finite number"),
    "true cfg inf": ([PROMPT, "--true-cfg", "inf"], "true_cfg must be a finite number"),
    "repulsion scale inf": ([PROMPT, "--repulsion-scale", "inf"], "repulsion scale must be a finite number"),
    "absurd n": ([PROMPT, "-n", "3000000000"], "n must be 1 to 4096"),
    "absurd steps": ([PROMPT, "--steps", "100000000000"], "steps must be 1 to 1000"),
    "absurd sequence": ([PROMPT, "--max-sequence-length", "100000"], "max_sequence_length must be 1 to 4096"),
    "too large for memory": ([PROMPT, "--width", "1024", "--height", "1024", "-n", "1", "--steps", "1"],
                             "needs about", "the largest that fits is", "--force"),
    "convert a missing file": (["convert", "flux1-dev.safetensors", "--base", "dev", "-q", "8", "-o", "out"],
                               "flux1-dev.safetensors does not exist"),
}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, model_arg, schnell_dir, hf_home):
    """Every run that depends on no other, started at once: the batch, the two conversions, each bad input."""
    root = tmp_path_factory.mktemp("cli")

    def folder(name):
        (root / name).mkdir()
        return root / name

    started = {"batch": Job([PROMPT, "--model", model_arg, "-n", 3, "--seed", 11, "-o", "pics"], folder("batch"),
                            hf_home),
               "convert8": Job(["convert", schnell_dir, "-q", 8, "-o", "flux-8bit"], folder("convert8"), hf_home)}
    bfl = folder("bfl")
    src = mx.load(str(schnell_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    mx.save_safetensors(str(bfl / "flux1-tiny.safetensors"), diffusers_to_bfl(src))
    started["bfl"] = Job(["convert", "flux1-tiny.safetensors", "--base", schnell_dir, "-o", "from-bfl", "--quiet"],
                         bfl, hf_home)
    started["ctrl-c"] = Job([PROMPT, "--model", model_arg, "-n", 4, "--batch-size", 2, "--steps", 30, "--seed", 5,
                             "-o", "pics"], folder("ctrl-c"), hf_home, interrupt_when="batch 2/2 step 2/")
    cache = hf_home.parent / "hf-with-schnell"  # a Hugging Face cache holding a (tiny) FLUX.1-schnell
    repo = cache / "hub" / "models--black-forest-labs--FLUX.1-schnell"
    shutil.copytree(schnell_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    started["download"] = Job(["download", "schnell", "--quiet"], folder("download"), cache)
    started["download4"] = Job(["download", "schnell", "-q", 4], folder("download4"), cache)
    started["bfl-guess"] = Job(["convert", "flux1-tiny.safetensors", "-o", "guessed"], bfl, hf_home)
    for case, (args, *_) in BAD.items():
        cwd = folder(case.replace(" ", "-").replace("<", "lt"))
        (cwd / "a-file").write_text("not a folder")
        if case == "from a blend":  # an app's blend or variation: its recipe needs recordings the file lacks
            metadata.write_png(cwd / "blend.png", Image.new("RGB", (16, 16)),
                               dict(prompt=PROMPT, n=3, seed=1, blend=dict(alphas=[0.5], blended_steps=2)))
        if args and "--model" not in args and args[0] not in cli.SUBCOMMANDS and args[0] != "--from":
            args = args + ["--model", model_arg]
        started[case] = Job(args, cwd, hf_home / case.replace(" ", "-").replace("<", "lt"))
    return started


@pytest.fixture(scope="module")
def batch(jobs):
    proc = jobs["batch"].wait()
    assert proc.returncode == 0, proc.stderr
    return jobs["batch"].cwd, proc


@pytest.fixture(scope="module")
def second_wave(jobs, batch, schnell_dir, hf_home):
    """The runs that need the batch's files or the converted folder, started together."""
    cwd, proc = batch
    paths = proc.stdout.splitlines()
    conv = jobs["convert8"].wait()
    assert conv.returncode == 0, conv.stderr
    return {"from": Job(["--from", paths[1], "--quiet", "-o", "again"], cwd, hf_home),
            "info_json": Job(["info", "--json", paths[1]], cwd, hf_home),
            "info": Job(["info", paths[1]], cwd, hf_home),
            "gen8": Job([LONG_PROMPT, "--model", "flux-8bit", "-n", 2, "--seed", 3, "--truncate", "--no-sheet"],
                        jobs["convert8"].cwd, hf_home),
            "again8": Job(["convert", schnell_dir, "-o", "flux-8bit"],
                          jobs["convert8"].cwd, hf_home)}


def test_generate_writes_decodable_pngs_and_a_sheet(batch):
    """A plain run writes n PNGs and a contact sheet into -o, nothing else anywhere, and prints exactly
    their paths on stdout, one a line; the images decode, have the recipe's size and differ."""
    cwd, proc = batch
    lines = proc.stdout.splitlines()
    assert lines == [f"pics/a-red-fox-11-{i}.png" for i in range(3)] + [
        "pics/a-red-fox-11-sheet.png"]
    assert files_under(cwd) == {Path("pics")} | {Path(p) for p in lines}  # no temp files, no other output
    images = [pixels(cwd / p) for p in lines[:3]]
    recipe = metadata.read_png(cwd / lines[0])
    for im in images:
        assert im.shape == (recipe["height"], recipe["width"], 3) and im.dtype == np.uint8
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    sheet = pixels(cwd / lines[3])
    assert min(sheet.shape[:2]) >= 256  # small images are scaled up so the sheet can be looked at


def test_progress_bar_goes_to_stderr(batch):
    """Without --quiet, stderr shows the progress bar: step, images, elapsed time and an estimate."""
    _, proc = batch
    recipe_steps = proc.stderr.count("step ")
    assert recipe_steps >= 1
    last = proc.stderr.split("\r")[-1]
    assert "[####################]" in last and "3 images" in last and "eta 0.0s" in last
    assert "wrote 3 image(s)" in proc.stderr


def test_recipe_round_trips(batch, second_wave, model_arg):
    """Each PNG carries its recipe: the JSON chunk has the batch settings, the image's index and seed,
    the repulsion settings (default: contextual at diversity 0.5, the geometric middle of the model's
    range) and the version; the A1111 `parameters` chunk starts with the prompt and names the seed;
    `info --json` prints exactly the recipe that read_png reads, `info` the A1111 text then the JSON."""
    cwd, proc = batch
    paths = proc.stdout.splitlines()
    for i, p in enumerate(paths[:3]):
        r = metadata.read_png(cwd / p)
        assert (r["prompt"], r["n"], r["seed"], r["index"], r["image_seed"]) == (PROMPT, 3, 11, i, 11 + i)
        assert r["model"] == (model_arg if model_arg == "demo" else str(Path(model_arg).resolve()))
        assert r["quantize"] is None and r["version"] == mlx_crepulse.__version__
        rep = r["method"]
        assert r["schema"] == 2 and r["diversity"] == 0.5
        assert rep["name"] == "contextual" and rep["blocks"] == "all" and rep["iterations"] >= 1
        assert isinstance(Recipe.from_dict(r).method, Repulsion)
        text = metadata.read_text_chunks(cwd / p)["parameters"]
        first, settings = text.split("\n")
        assert first == PROMPT
        assert f"Seed: {11 + i}," in settings and f"Size: {r['width']}x{r['height']}," in settings
        assert f"Steps: {r['steps']}," in settings and "Diversity: contextual scale=" in settings
    if model_arg != "demo":  # the tiny model keeps FLUX's default range, 1e8 to 5e9
        assert rep["scale"] == pytest.approx((1e8 * 5e9) ** 0.5, rel=1e-2)
    shown = second_wave["info_json"].wait()
    assert shown.returncode == 0 and json.loads(shown.stdout) == metadata.read_png(cwd / paths[1])
    human = second_wave["info"].wait()
    assert human.returncode == 0 and human.stdout.startswith(PROMPT + "\nSteps: ")
    assert json.loads(human.stdout.split("\n\n", 1)[1]) == json.loads(shown.stdout)


def test_negative_prompt_warns_only_when_true_cfg_is_off(tmp_path, model_arg, hf_home):
    """The warning that a negative prompt has no effect follows the resolved recipe (issue 17's drift
    bug): the demo's own default true CFG is 4, so `--negative-prompt` alone is used and must not warn,
    and the recipe records it; with `--true-cfg 1` it has no effect, and says so."""
    base = [PROMPT, "--model", "demo", "-n", "2", "--steps", "1", "--no-sheet", "--negative-prompt", "blue"]
    used = run(base, tmp_path, hf_home)
    assert used.returncode == 0 and "--negative-prompt has no effect" not in used.stderr, used.stderr
    assert "warning: this model knows only" in used.stderr and "new to it: fox" in used.stderr
    r = metadata.read_png(tmp_path / used.stdout.splitlines()[0])
    assert r["negative_prompt"] == "blue" and r["true_cfg"] == 4.0
    off = run(base + ["--true-cfg", "1", "-o", "off"], tmp_path, hf_home)
    assert off.returncode == 0 and "warning: --negative-prompt has no effect" in off.stderr


def test_demo_says_which_words_it_knows(tmp_path, hf_home):
    """The demo knows only its captions' words: a prompt inside them runs quietly, one outside gets a
    warning listing what is new to it and an example it understands (the newcomer's first prompt)."""
    known = run(["a small red circle on black", "-n", "2", "--steps", "1", "--no-sheet"], tmp_path, hf_home)
    assert known.returncode == 0 and "warning" not in known.stderr, known.stderr
    new = run(["a fox in the snow", "-n", "2", "--steps", "1", "--no-sheet", "-o", "fox"], tmp_path, hf_home)
    assert new.returncode == 0 and "new to it: fox in the snow (try \"a small red circle" in new.stderr


def test_from_reproduces_the_image_bit_for_bit(batch, second_wave):
    """`--from FILE.png` re-runs the file's whole batch and writes that one image again: the same
    pixels and the same recipe. With --quiet, stderr stays empty."""
    cwd, proc = batch
    original = proc.stdout.splitlines()[1]
    again = second_wave["from"].wait()
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert again.stdout == "again/a-red-fox-11-1.png\n"
    assert np.array_equal(pixels(cwd / again.stdout.strip()), pixels(cwd / original))
    assert metadata.read_png(cwd / again.stdout.strip()) == metadata.read_png(cwd / original)


# --- bad input: exit 2, one line, nothing written --------------------------------------------------------------

@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, jobs):
    """Each bad input is refused before any work: exit code 2, a single `error: ...` line on stderr
    saying what is wrong (for missing weights, which command fetches them; for a prompt over the
    token limit, by how much and that --truncate accepts the cut), nothing on stdout, and no file or
    folder created."""
    job = jobs[case]
    proc = job.wait()
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    for fragment in BAD[case][1:]:
        assert fragment in proc.stderr
    assert files_under(job.cwd) == job.before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_output_folder(tmp_path, model_arg, hf_home):
    """An output folder that exists but cannot be written is refused up front (exit 2)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        proc = run([PROMPT, "--model", model_arg, "-o", "locked"], tmp_path, hf_home)
    finally:
        locked.chmod(0o700)
    assert proc.returncode == 2 and "cannot write to the output folder locked" in proc.stderr
    assert files_under(tmp_path) == {Path("locked")}


# --- convert --------------------------------------------------------------------------------------------------

def test_convert_quantized_folder_generates(jobs, second_wave):
    """`convert FOLDER -q 8 -o OUT` writes a complete folder (8-bit transformer, its config says so),
    leaves no staging folder and prints the folder's path; `--model OUT` then generates from it (with
    --truncate, a prompt over the limit is cut with a warning saying how much); converting into a
    folder that is not empty is refused."""
    cwd = jobs["convert8"].cwd
    assert jobs["convert8"].wait().stdout == "flux-8bit\n"
    config = json.loads((cwd / "flux-8bit" / "transformer" / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    gen = second_wave["gen8"].wait()
    assert gen.returncode == 0, gen.stderr
    assert "warning: the prompt is" in gen.stderr and "; cut " in gen.stderr
    paths = gen.stdout.splitlines()
    assert len(paths) == 2 and all(p.startswith("out/") for p in paths)
    r = metadata.read_png(cwd / paths[0])
    assert r["quantize"] == 8 and r["model"] == str((cwd / "flux-8bit").resolve())
    again = second_wave["again8"].wait()
    assert again.returncode == 2 and "already exists" in again.stderr
    assert {p.name for p in cwd.iterdir()} == {"flux-8bit", "out"}


# BFL single-file names, written out from black-forest-labs/flux (independent of weights.py's table).
def diffusers_to_bfl(w: dict) -> dict:
    out = {}
    ren = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    double = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
              "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
              "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    single = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
    for key, v in w.items():
        stem, kind = key.rsplit(".", 1)
        if stem in ren:
            out[f"{ren[stem]}.{kind}"] = v
        elif stem == "norm_out.linear":  # diffusers (scale, shift) -> BFL (shift, scale)
            scale, shift = mx.split(v, 2, axis=0)
            out[f"final_layer.adaLN_modulation.1.{kind}"] = mx.concatenate([shift, scale], axis=0)
        elif stem.startswith("transformer_blocks."):
            _, i, rest = stem.split(".", 2)
            if rest in double:
                out[f"double_blocks.{i}.{double[rest]}.{kind}"] = v
            elif rest in norms:
                out[f"double_blocks.{i}.{norms[rest]}.scale"] = v
            elif rest in ("attn.to_q", "attn.add_q_proj"):
                names = ("to_q", "to_k", "to_v") if rest == "attn.to_q" else ("add_q_proj", "add_k_proj", "add_v_proj")
                side = "img" if rest == "attn.to_q" else "txt"
                out[f"double_blocks.{i}.{side}_attn.qkv.{kind}"] = mx.concatenate(
                    [w[f"transformer_blocks.{i}.attn.{n}.{kind}"] for n in names], axis=0)
        else:
            _, i, rest = stem.split(".", 2)
            if rest in single:
                out[f"single_blocks.{i}.{single[rest]}.{kind}"] = v
            elif rest in ("attn.norm_q", "attn.norm_k"):
                out[f"single_blocks.{i}.norm.{'query' if rest[-1] == 'q' else 'key'}_norm.scale"] = v
            elif rest == "attn.to_q":
                out[f"single_blocks.{i}.linear1.{kind}"] = mx.concatenate(
                    [w[f"single_transformer_blocks.{i}.{n}.{kind}"] for n in
                     ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")], axis=0)
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def test_convert_bfl_single_file(jobs, schnell_dir):
    """`convert flux1.safetensors --base FOLDER -o OUT` takes a BFL single-file transformer (fused qkv,
    swapped final modulation, ComfyUI prefix) with the rest of the pipeline from the base: the written
    folder holds exactly the base's transformer weights. Without --base, the base is guessed from the
    file (schnell: no guidance embedding) and, offline, the error names the download command."""
    from mlx.utils import tree_flatten

    from mlx_crepulse import Pipeline

    cwd = jobs["bfl"].cwd
    conv = jobs["bfl"].wait()
    assert conv.returncode == 0, conv.stderr
    assert conv.stdout == "from-bfl\n" and conv.stderr == ""
    ours = dict(tree_flatten(Pipeline.from_pretrained(str(cwd / "from-bfl")).transformer.parameters()))
    base = dict(tree_flatten(Pipeline.from_pretrained(str(schnell_dir)).transformer.parameters()))
    assert ours.keys() == base.keys()
    for k in base:
        assert np.array_equal(np.array(ours[k]), np.array(base[k])), k
    guess = jobs["bfl-guess"].wait()
    assert guess.returncode == 2 and "download schnell" in guess.stderr
    assert {p.name for p in cwd.iterdir()} == {"flux1-tiny.safetensors", "from-bfl"}


def test_download_from_the_hub_cache(jobs):
    """`download schnell` (here served offline from a Hugging Face cache that holds it) prints the
    folder that later runs load; with -q 4 it writes a 4-bit folder, named after the repo, in the
    current folder and prints that instead."""
    plain = jobs["download"].wait()
    assert plain.returncode == 0 and plain.stderr == ""
    assert plain.stdout.strip().endswith("models--black-forest-labs--FLUX.1-schnell/snapshots/" + "0" * 40)
    q4 = jobs["download4"].wait()
    assert q4.returncode == 0, q4.stderr
    assert q4.stdout == "FLUX.1-schnell-4bit\n" and "quantizing to 4 bits" in q4.stderr
    config = json.loads((jobs["download4"].cwd / "FLUX.1-schnell-4bit" / "transformer" / "config.json").read_text())
    assert config["quantization"] == {"bits": 4, "group_size": 64}
    assert files_under(jobs["download"].cwd) == set()


# --- Ctrl-C --------------------------------------------------------------------------------------------------

def test_ctrl_c_stops_between_steps_and_keeps_finished_batches(jobs):
    """SIGINT during the second of two batches stops after the current step: exit 130, "interrupted"
    on stderr, the first batch's images (and their sheet) kept whole, nothing of the second batch, no
    temporary files."""
    job = jobs["ctrl-c"]
    proc = job.wait()
    assert job.interrupted and proc.returncode == 130, proc.stderr
    assert "stopping after this step" in proc.stderr and "interrupted: kept 2 finished image(s)" in proc.stderr
    paths = proc.stdout.splitlines()
    assert paths == ["pics/a-red-fox-5-0.png", "pics/a-red-fox-5-1.png",
                     "pics/a-red-fox-5-sheet.png"]
    assert files_under(job.cwd) == {Path("pics")} | {Path(p) for p in paths}
    for p in paths:
        pixels(job.cwd / p)  # whole files


def test_ctrl_c_is_answered_at_once_during_a_long_step(tmp_path, hf_home):
    """A Ctrl-C that arrives while MLX evaluates a step (a batch of 8 at 128 px: seconds a step here) is
    answered within a second, not when the step ends: the message at once, then the stop at the step's
    end (exit 130, nothing written). Python's own handler could run only after the step."""
    args = [sys.executable, "-m", "mlx_crepulse", PROMPT, "--model", "demo", "-n", "8", "--width", "128",
            "--height", "128", "--steps", "2", "--no-sheet", "-o", "out", "--seed", "1"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(hf_home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    err, signalled, answered = b"", None, None
    while proc.poll() is None:
        err += proc.stderr.read() or b""
        if signalled is None and b"step 1/2" in err:  # the second step has just started
            proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
        if signalled and answered is None and b"stopping after this step" in err:
            answered = time.monotonic()
        time.sleep(0.01)
    ended = time.monotonic()
    assert proc.returncode == 130 and signalled and answered, err.decode()
    assert answered - signalled < 1.0 and ended - answered > answered - signalled
    assert files_under(tmp_path) == set()


# --- in-process pieces ---------------------------------------------------------------------------------------

def test_png_metadata_round_trip_in_process(tmp_path):
    """write_png/read_png keep any JSON-able recipe exactly (non-Latin prompt, lists, None, floats);
    the A1111 text quotes values with commas; overwrite=False adds -1, -2 instead of replacing."""
    from PIL import Image as PILImage

    image = PILImage.new("RGB", (16, 16), (200, 10, 30))
    recipe = dict(prompt="狐狸, in the snow: ünïcödé", n=2, seed=7, steps=4, guidance=3.5, width=16, height=16,
                  max_sequence_length=16, true_cfg=2.0, negative_prompt="blurry, dark", model="/x/y, z",
                  quantize=4, version="0.1.0", index=1, image_seed=8, blend=None, strength=None,
                  method=Repulsion(scale=2.5e8, blocks=[0, 3, 4]).to_dict())
    p1 = metadata.write_png(tmp_path / "a.png", image, recipe, overwrite=False)
    p2 = metadata.write_png(tmp_path / "a.png", image, recipe, overwrite=False)
    p3 = metadata.write_png(tmp_path / "a.png", image, recipe, overwrite=False)
    assert [p.name for p in (p1, p2, p3)] == ["a.png", "a-1.png", "a-2.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-1.png", "a-2.png", "a.png"]
    assert metadata.read_png(p2) == recipe
    text = metadata.read_text_chunks(p1)["parameters"]
    assert text.startswith(recipe["prompt"] + "\nNegative prompt: blurry, dark\nSteps: 4, ")
    assert 'Model: "/x/y, z"' in text and "Distilled CFG Scale: 3.5" in text and "Seed: 8," in text
    assert "Diversity: contextual scale=2.5e+08 iterations=None repelled steps=None blocks=0+3+4" in text
    PILImage.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no mlx-crepulse recipe"):
        metadata.read_png(tmp_path / "plain.png")


def test_methods_rebuild_from_their_dicts():
    """method_from_dict inverts to_dict for every method (also through JSON); a batch repelled from
    reference images cannot be rebuilt from the file, and says so."""
    for m in (Repulsion(scale=3e8, iterations=20, repelled_steps=2, blocks=[1, 2]), ParticleGuidance(scale=64.0, until=0.4),
              CADS(noise_scale=0.1, seed=9), None, "particle"):
        d = json.loads(json.dumps(method_to_dict(m)))
        assert method_from_dict(d) == m
    with pytest.raises(ValueError, match="reference images"):
        method_from_dict(dict(Repulsion().to_dict(), reference_size=3))
    with pytest.raises(ValueError, match="unknown diversity method"):
        method_from_dict({"name": "Nope"})


def test_diversity_knob_and_batches():
    """--diversity maps onto each method's range (contextual: lo*(hi/lo)**D, log scale; particle:
    D; cads: noise 0.5*D), 0 means plain seeds; --repulsion-blocks parses ranges; a trailing
    batch of one joins the previous batch when a method needs pairs."""
    d = Defaults(width=64, height=32, repulsion_scale_range=(1e8, 1e10), repulsion_iterations=7, repulsion_steps=2)

    def build(*argv, n=4):
        args = cli.generation_parser().parse_args(["p", "-n", str(n), "--seed", "5", *argv])
        return cli.recipe_from_args(args).resolve(d).method

    assert build() == Repulsion(scale=1e9, iterations=7, repelled_steps=2, blocks="all")
    assert build("--diversity", "1") == Repulsion(scale=1e10, iterations=7, repelled_steps=2)
    assert build("--diversity", "0") is None and build("--method", "none") is None
    assert build("--repulsion-scale", "5", "--repulsion-blocks", "0,3-5") == Repulsion(
        scale=5.0, iterations=7, repelled_steps=2, blocks=[0, 3, 4, 5])
    assert build("--method", "particle", "--diversity", "0.5") == ParticleGuidance(scale=0.5)
    assert build("--method", "cads", "--diversity", "0.5") == CADS(noise_scale=0.25, seed=5)
    assert build(n=1) is None  # one image: nothing to push apart, plain seeds
    assert cli._batches(5, 2, True) == [(0, 2), (2, 3)]
    assert cli._batches(5, 2, False) == [(0, 2), (2, 2), (4, 1)]
    assert cli._batches(3, None, True) == [(0, 3)]
    assert metadata.slug("  A Red Fox, in the Snow!  ") == "a-red-fox-in-the-snow"


def test_disk_full_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    """The disk filling up after two images (the file system's ENOSPC, raised by the PNG writer):
    exit 2 with one line naming the folder and what was kept; the two images are whole, nothing else
    (no partial file, no sheet) is left."""
    import errno

    written = []
    real = metadata.write_png

    def filling(path, *a, **k):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(real(path, *a, **k))
        return written[-1]
    monkeypatch.setattr(metadata, "write_png", filling)
    out = tmp_path / "pics"
    code = cli.main([PROMPT, "--model", "demo", "-n", "4", "--steps", "1", "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"cannot write to {out}: No space left on device; kept the 2 image(s)" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    for p in written:
        pixels(p)
