"""Fuzzing the command line and the recipe files: whatever the arguments, a run ends with exit 0 (images
written, each decodable) or exit 2 (one line `error: ...`, nothing written); never a traceback.

Runs in-process on the bundled demo model at tiny sizes and step counts. FUZZ_EXAMPLES sets the number
of runs of each test (the suite's default keeps both within a minute here; `FUZZ_EXAMPLES=500 python -m
pytest tests/test_fuzz.py` is the long setting).
"""

import contextlib
import io
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlx_crepulse import cli, metadata

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

numbers = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e30, -1e30, 0.5, 1.0, 4.0]))
counts = st.one_of(st.integers(-2, 4), st.sampled_from([2**31, 2**64 - 1, 2**64 + 5, 3_000_000_000, 10**11]))
sizes = st.sampled_from([-16, 0, 8, 16, 24, 32, 48, 99_999, 16_400])
texts = st.one_of(st.sampled_from(["a red circle", "", "   ", "a blue square on grey", "狐狸 ünï",
                                   "a red circle " * 40]), st.text(max_size=20))
OPTIONS = {  # flag -> the values it is fuzzed with (as the shell would pass them: text)
    "-n": st.one_of(st.integers(-1, 3), st.sampled_from([3_000_000_000])),
    "--seed": st.one_of(st.integers(-3, 3), st.sampled_from([2**64 - 1, 2**64, -(2**63)])),
    "--steps": st.one_of(st.integers(-1, 3), st.sampled_from([10**11])),
    "--width": sizes, "--height": sizes,
    "--guidance": numbers, "--true-cfg": numbers, "--diversity": numbers,
    "--method": st.sampled_from(["none", "contextual", "particle", "cads", "fancy"]),
    "--repulsion-scale": numbers, "--repulsion-iterations": st.integers(-1, 3),
    "--repulsion-steps": st.integers(-1, 3),
    "--repulsion-blocks": st.sampled_from(["all", "double", "single", "0", "0,1", "1-0", "7", "x", ""]),
    "--max-sequence-length": st.sampled_from([-5, 0, 1, 8, 20, 100_000]),
    "--negative-prompt": texts, "--batch-size": st.integers(-1, 3),
}
FLAGS = ("--truncate", "--no-sheet", "--all")


def run(argv, out: Path):
    """cli.main in this process; (exit code, stderr). An exception escaping main fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([*argv, "-o", str(out), "--quiet", "--model", "demo"])
    return code, err.getvalue()


def check(code, err, out: Path):
    files = sorted(out.rglob("*")) if out.exists() else []
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert files == [], files
    else:
        assert files and all(p.suffix == ".png" and not p.name.startswith(".") for p in files), files
        for p in files:
            with Image.open(p) as im:
                im.load()


def fresh(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "out"


@FUZZ
@given(prompt=texts, options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})), flags=st.sets(st.sampled_from(FLAGS)))
def test_command_line_exits_0_or_2(tmp_path_factory, prompt, options, flags):
    """Any prompt, any of the options with values in and out of range (NaN, inf, negative, absurd):
    exit 0 with decodable images, or exit 2 with one line and nothing written."""
    argv = [prompt] + [x for k, v in options.items() for x in (k, str(v))] + sorted(flags)
    if "--steps" not in options:
        argv += ["--steps", "1"]  # the demo's 12 steps would make each run 12 times longer
    out = fresh(tmp_path_factory)
    code, err = run(argv, out)
    check(code, err, out)


GOOD = dict(schema=2, prompt="a red circle", n=2, seed=1, steps=1, guidance=None, true_cfg=4.0, negative_prompt="",
            width=32, height=32, max_sequence_length=20, diversity=0.5,
            method=dict(name="contextual", scale=7000.0, iterations=3, repelled_steps=1, blocks="all", eps=1e-6,
                        tokens="text", reference_scale=None),
            blend=None, strength=None, model="demo", quantize=None, version="0.2.0", index=0, image_seed=1)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=6)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(GOOD) + ["method.scale", "method.blocks", "method.name",
                                                               "extra"]), json_values, max_size=4),
       dropped=st.sets(st.sampled_from(sorted(GOOD)), max_size=2))
def test_recipe_files_exit_0_or_2(tmp_path_factory, changes, dropped):
    """A PNG whose recipe has fields replaced by any JSON value, or dropped: `--from` exits 0 or 2."""
    recipe = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key.startswith("method."):
            if isinstance(recipe.get("method"), dict):
                recipe["method"][key.split(".")[1]] = value
        else:
            recipe[key] = value
    for key in dropped:
        recipe.pop(key, None)
    folder = fresh(tmp_path_factory).parent
    source = folder / "in.png"
    try:
        metadata.write_png(source, Image.new("RGB", (8, 8)), recipe)
    except ValueError:  # NaN or infinity: JSON cannot hold them, so no file can carry them
        assert any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(recipe))
        return
    code, err = run(["--from", str(source)], folder / "out")
    check(code, err, folder / "out")


def _leaves(x):
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, list):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


@pytest.mark.parametrize("argv", [["a red circle", "--seed", "-1", "-n", "2", "--steps", "1"]])
def test_seed_minus_one_means_random(tmp_path, argv):
    """A1111's convention: --seed -1 picks a random seed (recorded in the file), not an error."""
    code, err = run(argv, tmp_path / "out")
    assert code == 0, err
    seeds = {metadata.read_png(p)["seed"] for p in (tmp_path / "out").glob("*-0.png")}
    assert len(seeds) == 1 and seeds.pop() >= 0
