"""The Recipe: one owner of a generation's settings.

What these prove: files written by mlx-crepulse 0.1.0 (fixtures made by that version's CLI and app on
the demo model) still read, migrate and re-run bit for bit; a recipe survives its own JSON; every bad
value is refused with one RecipeError naming the field, before any work; a model's defaults fill in
exactly the unset fields.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_crepulse import (CADS, Blend, Defaults, ParticleGuidance, Pipeline, Recipe, RecipeError, Repulsion,
                          metadata)
from mlx_crepulse.recipe import SCHEMA, migrate

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1"
PNGS = sorted((FIXTURES / "png").glob("*.png"))


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_pretrained("demo")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# The fixtures were made with MLX's own CPU BLAS, as a bare machine runs it; float32 sums in another BLAS
# (a system OpenBLAS, which mlx_crepulse.blas loads when it is installed) round differently, so they are
# re-run in a child process that keeps MLX's bundled BLAS.
BUNDLED = dict(os.environ, MLX_CREPULSE_BLAS="bundled")
RERUN = """
import hashlib, sys, numpy as np
from PIL import Image
from mlx_crepulse import Pipeline, Recipe, blas, metadata
assert blas.LOADED == "bundled"
pipe = Pipeline.from_pretrained("demo")
probe = np.asarray(pipe.generate(Recipe("a red circle", n=2, seed=0, steps=1), output_type="np").images, np.float32)
print("fingerprint", hashlib.sha256(probe.tobytes()).hexdigest())
for path in sys.argv[1:]:
    stored = metadata.read_png(path)
    assert "schema" not in stored and "repulsion" in stored  # really the 0.1 schema
    out = np.asarray(pipe.generate(Recipe.from_dict(stored)).images[stored["index"]], np.int16)
    print(path, int(np.abs(out - np.asarray(Image.open(path).convert("RGB"), np.int16)).max()))
"""
FINGERPRINT = (FIXTURES / "fingerprint.txt").read_text().strip()  # the fixtures' machine: demo, one step, hashed


PRELOADED = pytest.mark.skipif("openblas" in os.environ.get("LD_PRELOAD", ""),
                               reason="OpenBLAS is preloaded into every process")


@pytest.fixture(scope="module")
def rerun():
    """The fixtures re-run in a child process with the bundled BLAS: ({path: max pixel difference},
    whether this machine computes as the fixtures' did)."""
    paths = [str(p) for p in PNGS if "sheet" not in p.name]
    proc = subprocess.run([sys.executable, "-c", RERUN, *paths], env=BUNDLED, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines())
    return {k: int(v) for k, v in lines.items() if k != "fingerprint"}, lines["fingerprint"] == FINGERPRINT


@PRELOADED
def test_pngs_of_version_0_1_rerun_bit_for_bit(rerun):
    """Every 0.1.0 PNG's recipe (schema 1: `repulsion` by class name, `steps` for repelled steps)
    migrates, and the batch it describes comes out with the very same pixels. On a CPU whose float
    arithmetic differs from the one that made the fixtures (its fingerprint, a hashed one-step batch,
    differs) rounding may move a pixel level, and only that is allowed there."""
    differences, same_machine = rerun
    assert set(differences) == {str(p) for p in PNGS if "sheet" not in p.name}
    assert all(d <= (0 if same_machine else 2) for d in differences.values()), (same_machine, differences)


def test_migration_of_schema_1_names():
    """Schema 1 -> 2: the method's class name becomes its name, a repulsion's `steps` its
    `repelled_steps`, a blend's `steps` its `blended_steps`; everything else is kept."""
    old = dict(prompt="p", n=3, seed=1, steps=12, blend=dict(alphas=[0.5], steps=2),
               repulsion=dict(method="Repulsion", scale=5.0, iterations=3, steps=2, blocks=[0], eps=1e-6,
                              tokens="text", reference_scale=None))
    new = migrate(old)
    assert new["schema"] == SCHEMA and "repulsion" not in new and new["steps"] == 12
    assert new["method"] == dict(name="contextual", scale=5.0, iterations=3, repelled_steps=2, blocks=[0], eps=1e-6,
                                 tokens="text", reference_scale=None)
    assert new["blend"] == dict(alphas=[0.5], blended_steps=2)
    for name, cls in (("ParticleGuidance", ParticleGuidance), ("CADS", CADS)):
        m = Recipe.from_dict(dict(prompt="p", n=2, repulsion=dict(method=name))).method
        assert type(m) is cls
    with pytest.raises(RecipeError, match="newer than this"):
        Recipe.from_dict(dict(prompt="p", schema=99))


@PRELOADED
def test_cli_from_a_0_1_png_writes_the_same_pixels(tmp_path, rerun):
    """The CLI's `--from` on a 0.1.0 file: the same image, now with a schema-2 recipe."""
    source = next(p for p in PNGS if p.name == "a-red-circle-3-0.png")  # true CFG, listed blocks
    proc = subprocess.run([sys.executable, "-m", "mlx_crepulse", "--from", str(source), "-o", str(tmp_path),
                           "--quiet"], capture_output=True, text=True, timeout=300, env=BUNDLED)
    assert proc.returncode == 0, proc.stderr
    written = Path(proc.stdout.strip())
    allowed = 0 if rerun[1] else 2  # bit for bit on the fixtures' machine (see above)
    assert np.abs(pixels(written).astype(int) - pixels(source)).max() <= allowed
    assert metadata.read_png(written)["schema"] == SCHEMA


def test_round_trip_through_json():
    """to_dict -> JSON -> from_dict gives the same recipe, for every method and a blend's settings."""
    for method in (None, "particle", Repulsion(scale=3.0, iterations=4, repelled_steps=2, blocks=[1, 2]),
                   ParticleGuidance(scale=0.3), CADS(noise_scale=0.1, seed=4)):
        r = Recipe("a fox", n=3, seed=5, steps=7, guidance=3.5, true_cfg=2.0, negative_prompt="blur", width=64,
                   height=32, max_sequence_length=16, diversity=0.3, method=method, model="dev", quantize=4)
        again = Recipe.from_dict(json.loads(json.dumps(r.to_dict(), allow_nan=False)))
        assert again == r
    blended = Recipe("a fox", n=3, seed=1, blend=Blend([0.25], blended_steps=2))
    assert Recipe.from_dict(json.loads(json.dumps(blended.to_dict()))).blend.to_dict() == blended.blend.to_dict()


def test_resolve_fills_only_what_is_unset():
    """The model's defaults fill the None fields, and nothing else; the negative prompt is kept only
    where true CFG uses it; -1 and None pick a seed; numpy integers are integers."""
    d = Defaults(steps=9, true_cfg=4.0, negative_prompt="ugly", width=64, height=48, max_sequence_length=30,
                 repulsion_scale_range=(10.0, 1000.0), repulsion_iterations=5, repulsion_steps=2)
    r = Recipe("p", n=np.int64(2), seed=-1, diversity=0.5).resolve(d)
    assert (r.n, r.steps, r.true_cfg, r.negative_prompt, r.width, r.height, r.max_sequence_length) == \
        (2, 9, 4.0, "ugly", 64, 48, 30)
    assert isinstance(r.n, int) and 0 <= r.seed < 2**31 and r.resolved
    assert r.method == Repulsion(scale=100.0, iterations=5, repelled_steps=2)
    own = Recipe("p", n=2, seed=3, steps=2, true_cfg=1.0, negative_prompt="x", width=16).resolve(d)
    assert (own.steps, own.true_cfg, own.negative_prompt, own.width, own.height) == (2, 1.0, None, 16, 48)
    assert own.resolve(d) == own  # resolving twice changes nothing


BAD = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=5), "prompt must be text"),
    (dict(n=0), "n must be 1 to 4096"),
    (dict(n=3_000_000_000), "n must be 1 to 4096"),
    (dict(n=2.0), "n must be a whole number"),
    (dict(steps="twelve"), "steps must be a whole number"),
    (dict(steps=100_000_000_000), "steps must be 1 to 1000"),
    (dict(seed=-2), "seed must be -1 (random) or 0 to"),
    (dict(seed=2**64 - 1, n=2), "seed must be -1 (random) or 0 to"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(true_cfg=float("inf")), "true_cfg must be a finite number"),
    (dict(true_cfg=0.5), "true_cfg must be 1 (off) or more"),
    (dict(max_sequence_length=-5), "max_sequence_length must be 1 to 4096"),
    (dict(width=0), "width must be 16 to 16384, not 0 (None: the model's size)"),
    (dict(max_sequence_length=100_000), "max_sequence_length must be 1 to 4096"),
    (dict(diversity=1.5), "diversity must be between 0 and 1"),
    (dict(strength=0), "strength must be in (0, 1]"),
    (dict(quantize=3), "quantize must be 4 or 8"),
    (dict(method="contextual", n=1), "needs a batch of at least 2 images"),
    (dict(method="fancy"), "method must be one of none, contextual, particle, cads"),
    (dict(method=Repulsion(scale=float("inf"))), "repulsion scale must be a finite number"),
    (dict(method=Repulsion(blocks="middle")), "repulsion blocks must be"),
    (dict(method=3), "method must be Repulsion, ParticleGuidance, CADS"),
    (dict(blend=Blend([0.5]), n=4), "n must be 3"),
]


@pytest.mark.parametrize("settings, words", BAD, ids=[w for _, w in BAD])
def test_bad_settings_are_refused_by_the_recipe(settings, words):
    """Each bad value: one RecipeError (a ValueError) that names the field, at construction."""
    with pytest.raises(RecipeError) as e:
        Recipe(**{"prompt": "p", **settings})
    assert words in str(e.value)


def test_bad_recipe_files_are_refused():
    """A recipe file with a wrong type or an unknown key: one RecipeError naming it (issue 18)."""
    for d, words in ((dict(prompt=5), "prompt must be text"), (dict(prompt="p", steps="twelve"), "steps must be"),
                     (dict(prompt="p", colour="red"), "unknown recipe setting(s) colour"),
                     ([1, 2], "a recipe is a JSON object"),
                     (dict(prompt="p", method=dict(name="contextual", wobble=1)), "unknown contextual setting")):
        with pytest.raises(RecipeError, match=words.replace("(", r"\(").replace(")", r"\)")):
            Recipe.from_dict(d)


def test_pipeline_refuses_what_the_model_cannot_do_before_any_work(demo, monkeypatch):
    """Model-specific checks (size multiple, block indices, start image size) come before encoding."""
    monkeypatch.setattr(demo, "encode", lambda *a: pytest.fail("work started before checking"))
    for kw, words in ((dict(width=40), "width 40 must be a multiple of 16"),
                      (dict(n=2, method=Repulsion(blocks=[99])), "repulsion blocks [99] out of range"),
                      (dict(n=1, strength=0.5, image=np.zeros((1, 16, 16, 3))), "the start image must be"),
                      (dict(n=1, strength=0.5), "needs both an image and a strength")):
        with pytest.raises(RecipeError, match=words.replace("[", r"\[").replace("]", r"\]")):
            demo.generate("a red circle", **kw)


def test_memory_estimate_refuses_before_work_and_force_overrides(demo, monkeypatch):
    """A batch whose step cannot fit is refused before any work with the numbers and the largest size
    that fits (a fake 4 GiB machine here); the estimate grows as the attention's S^2 on the CPU; with
    force=True the same recipe runs."""
    from mlx_crepulse import footprint

    configs = demo.files.configs
    small = demo.resolve("a red circle", n=2, seed=1, steps=1, width=64, height=64)
    double = demo.resolve("a red circle", n=2, seed=1, steps=1, width=128, height=128)
    heads = configs["transformer"]["num_attention_heads"]
    for r in (small, double):  # the CPU's scores: 3 float32 arrays of (2n with true CFG) x heads x S x S
        tokens = (r.width // 4) * (r.height // 4) + r.max_sequence_length  # the demo: 4 px a token
        scores = footprint.step_bytes(configs, r, True) - footprint.step_bytes(configs, r, False)
        assert scores == 3 * (2 * r.n) * heads * tokens ** 2 * 4
    monkeypatch.setattr(footprint, "physical_memory", lambda: 4 * footprint.GiB)
    monkeypatch.setattr(demo, "encode", lambda *a: pytest.fail("work started before checking"))
    with pytest.raises(footprint.TooLarge, match=r"needs about .* the largest that fits is \d+x\d+ with n=4"):
        demo.generate("a red circle", n=4, seed=1, steps=1, width=256, height=256)
    monkeypatch.undo()
    assert len(demo.generate("a red circle", n=2, seed=1, steps=1, width=64, height=64, force=True).images) == 2


def test_history_of_version_0_1_opens_and_migrates(tmp_path):
    """A 0.1.0 history database (user_version 1) opens: its recipes are migrated in place to schema
    2 (user_version 2), every batch's recipe reads back as a Recipe, and a run-again job is built for
    each (blends and variations included)."""
    from desktop import refine
    from desktop.history import History, USER_VERSION

    folder = tmp_path / "history"
    shutil.copytree(FIXTURES / "history", folder)
    with sqlite3.connect(folder / "history.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    h = History(folder)
    try:
        with sqlite3.connect(folder / "history.sqlite3") as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == USER_VERSION == 2
        batches = h.batches()
        assert len(batches) == 7
        kinds = set()
        for b in batches:
            assert b.recipe["schema"] == SCHEMA and "repulsion" not in b.recipe
            job = refine.rerun(h, h.batch(b.id))
            assert job.recipe.prompt == b.prompt and job.recipe.n == len(b.images)
            kinds.add(b.kind)
        assert {"generate", "vary-subtle", "vary-strong", "explore", "blend", "upscale"} <= kinds
    finally:
        h.close()
    History(folder).close()  # opening a migrated database again changes nothing


def test_non_finite_steps_stop_the_batch(demo):
    """A repulsion scale far above the model's range makes the step non-finite: NotFinite names that
    cause before anything is decoded or returned (it used to save black PNGs); NaN latents are refused
    up front; the Vendi score of nothing says so."""
    from mlx_crepulse import NotFinite, vendi_score

    with pytest.raises(NotFinite, match="repulsion scale 1e\\+30 is far above this model's range"):
        demo.generate("a red circle", n=2, seed=1, steps=2, method=Repulsion(scale=1e30))
    bad = np.full((2, 64, 16), np.nan, np.float32)
    with pytest.raises(RecipeError, match="latents hold NaN"):
        demo.generate("a red circle", n=2, seed=1, steps=1, latents=bad)
    with pytest.raises(ValueError, match="one or more finite feature vectors"):
        vendi_score(np.zeros((0, 4)))
