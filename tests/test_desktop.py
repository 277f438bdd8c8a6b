"""The desktop app, driven as a person would (pytest-qt, offscreen), on the real pipeline.

The model is the bundled demo once it exists (mlx_crepulse/demo_model/model_index.json), else a tiny
random pipeline folder (tests/tiny.py); nothing of the engine is mocked. One engine thread serves
every window of the session, so the model loads once.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PIL import Image as PILImage  # noqa: E402
from PySide6.QtCore import QSettings, Qt, QTimer  # noqa: E402

import mlx_crepulse  # noqa: E402
from desktop import controls, estimate, history as history_mod, models, refine, worker  # noqa: E402
from desktop.history import History  # noqa: E402
from desktop.viewer import Compare, Viewer  # noqa: E402
from desktop.window import MainWindow  # noqa: E402
from mlx_crepulse import hub, metadata  # noqa: E402

DEMO_INDEX = Path(mlx_crepulse.__file__).parent / "demo_model" / "model_index.json"
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120_000  # ms for one batch on a busy 2-core machine


@pytest.fixture(scope="session")
def model_source(request):
    """The one switch: "demo" when the bundled model exists, else a tiny random pipeline folder."""
    if DEMO_INDEX.exists():
        return "demo"
    return str(request.getfixturevalue("schnell_dir"))


@pytest.fixture(scope="module", autouse=True)
def engine_thread():
    yield
    worker.shutdown()


@pytest.fixture
def make_window(qtbot, tmp_path, model_source):
    def make(data_dir=None, n=3, steps=None):
        settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
        w = MainWindow(data_dir=data_dir or tmp_path / "data", settings=settings)
        qtbot.addWidget(w)
        w.ask = lambda *a: False  # no modal questions in tests
        w.form.set_source(model_source)
        w.form.n.setValue(n)
        if steps:
            w.form.steps.setValue(steps)
        w.resize(1100, 760)
        w.show()
        qtbot.waitExposed(w)
        return w
    return make


def run(qtbot, w, start) -> int:
    """Start a job with `start()` and wait for its end; returns the new batch id."""
    with qtbot.waitSignal(w.job_ended, timeout=TIMEOUT) as ended:
        assert start() is True, w.banner.text
    assert ended.args == ["finished"], w.banner.text
    return w.batch.id


def generate(qtbot, w, prompt="a red fox", seed=None):
    w.form.prompt.setPlainText(prompt)
    if seed is not None:
        w.form.seed.setValue(seed)

    def start():
        w.form.prompt.setFocus()
        qtbot.keyClick(w.form.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)  # Ctrl+Enter
        return w.job is not None
    return run(qtbot, w, start)


@contextlib.contextmanager
def collecting(signal):
    """Everything `signal` carries while the block runs (connected directly: runs in the engine thread)."""
    got = []

    def slot(*args):
        got.append(args)
    signal.connect(slot)
    try:
        yield got
    finally:
        signal.disconnect(slot)


def pixels(path) -> np.ndarray:
    with PILImage.open(path) as im:
        return np.asarray(im.convert("RGB"), np.int16)


# --- generating and cancelling ------------------------------------------------------------------------------

def test_generation_fills_grid_with_previews(qtbot, make_window):
    w = make_window(n=3)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    with collecting(w.engine.preview) as previews, collecting(w.engine.progress) as progress:
        batch_id = generate(qtbot, w)
    timer.stop()
    assert max(np.diff(ticks)) < 1.0  # the window never froze, model loading included
    b = w.history.batch(batch_id)
    assert len(b.images) == 3 and len(w.grid.tiles) == 3
    assert all(t.final and not t.image.isNull() for t in w.grid.tiles)
    assert previews and len(previews[0][0]) == 3  # each tile saw a preview before the final image
    assert progress[-1][0] == progress[-1][1]
    assert all(im.path.is_file() for im in b.images)
    recipe = metadata.read_png(b.images[0].path)  # the CLI's metadata in each PNG
    assert recipe["prompt"] == "a red fox" and recipe["index"] == 0
    assert w.form.generate.isEnabled() and not w.cancel_btn.isEnabled()
    # the tiles are large enough to judge
    assert w.grid.tiles[0].width() >= 192


def test_previews_turn_quick_when_a_decode_weighs_on_the_steps(qtbot, make_window, monkeypatch):
    """The worker shows full decodes while they are cheap next to a step (the demo: 32-pixel images at full
    size); when a decode costs more than QUICK_WHEN of a step and QUICK_FLOOR_S (forced here with 0), the first preview of a
    run is still a decode, which measures it, and the rest come from the latent-to-RGB map, at the latent
    image's size. The final images are decoded in full either way."""
    w = make_window(n=2, steps=6)
    with collecting(w.engine.preview) as full:
        generate(qtbot, w, seed=1)
    monkeypatch.setattr(worker, "QUICK_WHEN", 0.0)
    monkeypatch.setattr(worker, "QUICK_FLOOR_S", 0.0)
    with collecting(w.engine.preview) as mixed:
        batch_id = generate(qtbot, w, seed=2)
    size = w.history.batch(batch_id).images[0].path
    side = PILImage.open(size).width
    assert full and {q.width() for images, *_ in full for q in images} == {side}
    widths = [images[0].width() for images, *_ in mixed]
    assert len(widths) >= 2 and widths[0] == side and set(widths[1:]) == {side // 2}  # the demo's VAE: 2x
    assert all(t.final and t.image.width() == side for t in w.grid.tiles)


def test_cancel_mid_run_keeps_window_usable(qtbot, make_window):
    w = make_window(n=2, steps=60)
    before = w.history.count()
    w.form.prompt.setPlainText("a slow lighthouse")
    with collecting(w.engine.progress) as progress, qtbot.waitSignal(w.job_ended, timeout=TIMEOUT) as ended:
        assert w.generate()
        qtbot.waitUntil(lambda: len(progress) >= 2, timeout=TIMEOUT)
        asked_at = progress[-1][0]
        qtbot.keyClick(w, Qt.Key.Key_Escape)
        assert "Cancelling" in w.progress_label.text()
    steps = [p[0] for p in progress]
    assert ended.args == ["cancelled"]
    assert max(steps) <= asked_at + 1 < 60  # stopped within one step
    assert w.history.count() == before  # nothing half-done is saved
    assert w.form.generate.isEnabled() and not w.engine.busy
    assert w.progress_label.text() == "Cancelled"
    w.form.steps.setValue(0)
    generate(qtbot, w, "after a cancel")  # the window and the engine still work


# --- stars, keyboard, viewer -------------------------------------------------------------------------------

def test_stars_keyboard_and_restart(qtbot, make_window, tmp_path):
    data = tmp_path / "data"
    w = make_window(data_dir=data, n=3)
    generate(qtbot, w)
    g = w.grid
    g.setFocus()
    assert g.current == 0
    qtbot.keyClick(g, Qt.Key.Key_Right)
    assert g.current == 1
    qtbot.keyClick(g, Qt.Key.Key_S)  # star with a key
    tile = g.tiles[2]
    qtbot.mouseClick(tile, Qt.MouseButton.LeftButton, pos=tile.star_rect().center())  # and with a click
    assert g.current == 2 and [t.starred for t in g.tiles] == [False, True, True]
    qtbot.keyClick(g, Qt.Key.Key_Space)  # un-star
    qtbot.keyClick(g, Qt.Key.Key_Space)  # star again
    # Enter opens the full view; arrows move in it, S stars there too
    qtbot.keyClick(g, Qt.Key.Key_Left)
    qtbot.keyClick(g, Qt.Key.Key_Left)
    qtbot.keyClick(g, Qt.Key.Key_Return)
    viewer = [d for d in w.dialogs if isinstance(d, Viewer)][-1]
    assert viewer.isVisible() and viewer.index == 0
    qtbot.keyClick(viewer, Qt.Key.Key_Right)
    assert viewer.index == 1 and viewer.current.starred
    viewer.close()
    # compare: pin with C, select another, C again
    qtbot.keyClick(g, Qt.Key.Key_C)
    qtbot.keyClick(g, Qt.Key.Key_Right)
    qtbot.keyClick(g, Qt.Key.Key_C)
    cmp = [d for d in w.dialogs if isinstance(d, Compare)][-1]
    assert cmp.isVisible() and (cmp.a.index, cmp.b.index) == (0, 1)
    cmp.close()
    w.form.n.setValue(5)
    w.form.diversity.setValue(8)
    w.form.advanced_button.setChecked(True)
    w.close()

    w2 = make_window(data_dir=data, n=5)  # a restart of the app object, same folder and preferences
    assert [t.starred for t in w2.grid.tiles] == [False, True, True]
    assert [im.index for im in w2.history.starred()] == [1, 2]
    assert w2.form.diversity.value() == 8 and w2.form.advanced_button.isChecked()
    w2.history_view.starred_only.setChecked(True)
    assert [im.index for im in w2.history_view.grid.items()] == [1, 2]


# --- refine, explore, blend, upscale, history ----------------------------------------------------------------

def test_refine_explore_blend_upscale_and_rerun(qtbot, make_window, tmp_path):
    w = make_window(n=3)
    w.form.diversity.setValue(5)
    first = generate(qtbot, w, seed=1234)
    h = w.history
    g = w.grid
    g.select(0)
    g.toggle_star()
    g.select(1)
    g.toggle_star()
    a, b = h.starred()  # image 0, then image 1
    assert (a.index, b.index) == (0, 1)

    g.select(0)
    subtle = run(qtbot, w, lambda: w.vary(refine.SUBTLE))
    g.select(0)  # image 0 of the subtle batch, which has stored noise: a variation of a variation
    strong = run(qtbot, w, lambda: w.vary(refine.STRONG))
    assert h.inputs(first) == {}  # a plain batch is rebuilt from its seeds
    for batch_id, parent in ((subtle, a.id), (strong, h.batch(subtle).images[0].id)):
        bb = h.batch(batch_id)
        assert bb.kind.startswith("vary") and bb.parent_image == parent and len(bb.images) == 3
        assert bb.recipe["method"]["name"] == "contextual"  # repelled among themselves
    assert h.batch(subtle).recipe["blend"] == dict(alphas=[0.0], blended_steps=0)  # subtly: pushed as the favourite was
    assert h.batch(strong).recipe["blend"] is None

    def closeness(batch_id):  # mean correlation of the new noises with each other
        lat = h.inputs(batch_id)["latents"]
        return np.mean([np.corrcoef(lat[i].ravel(), lat[j].ravel())[0, 1] for i, j in ((0, 1), (0, 2), (1, 2))])
    assert closeness(subtle) > 0.8 and 0.35 < closeness(strong) < 0.8  # 1 - mix**2: 0.91 and 0.58

    seen = sum(len(x.images) for x in h.batches() if x.prompt == "a red fox")
    explore = run(qtbot, w, w.explore)
    e = h.batch(explore)
    assert e.kind == "explore" and e.recipe["method"]["reference_size"] == seen
    assert h.inputs(explore)["reference"].shape[0] == seen

    blend = run(qtbot, w, lambda: w.blend(a, b, [1.3]))  # extrapolation beyond B
    bl = h.batch(blend)
    assert bl.recipe["blend"]["alphas"] == [1.3] and len(bl.images) == 3
    assert [im.label for im in bl.images][:2] == ["A", "B"]
    # A and B come out as the favourites themselves, though their batch was repelled (recorded and replayed)
    assert h.batch(first).recipe["method"] is not None
    for fav, row in ((a, bl.images[0]), (b, bl.images[1])):
        assert np.abs(pixels(fav.path) - pixels(row.path)).max() <= 1
    lat = h.inputs(blend)["latents"]
    assert np.array_equal(lat[0], lat[2]) and not np.array_equal(lat[0], lat[1])  # the blend keeps A's noise
    with pytest.raises(ValueError):
        refine.blend(h, a, b, [2.0])

    w.grid.select(0)
    g0 = w.grid.current_item()
    up = run(qtbot, w, w.upscale)
    u = h.batch(up)
    assert u.kind == "upscale" and u.images[0].width == 2 * g0.width and u.recipe["strength"] == 0.5

    # history: run a stored recipe again -> the same pixels (custom noise, blend, plain seeds)
    w.tabs.setCurrentIndex(1)
    hv = w.history_view
    for batch_id in (subtle, blend, first):
        hv.refresh(select_batch=batch_id)
        assert hv.current_batch().id == batch_id
        again = run(qtbot, w, lambda: (hv.rerun_btn.click(), w.job is not None)[1])
        for old, new in zip(h.batch(batch_id).images, h.batch(again).images):
            assert np.abs(pixels(old.path) - pixels(new.path)).max() <= 1
    # "use settings" fills the form with a new seed (Run again is the exact batch); with the old seed typed
    # back in, generating from it reproduces the plain batch
    hv.refresh(select_batch=first)
    hv.use_btn.click()
    assert w.form.prompt.toPlainText() == "a red fox" and w.form.seed.value() == -1
    w.form.seed.setValue(1234)
    same = generate(qtbot, w)
    for old, new in zip(h.batch(first).images, h.batch(same).images):
        assert np.abs(pixels(old.path) - pixels(new.path)).max() <= 1
    # export copies PNGs with their recipes
    w.tabs.setCurrentIndex(1)
    hv.refresh(select_batch=first)
    out = hv.export_to(tmp_path / "export")
    assert len(out) == 3 and metadata.read_png(out[0])["seed"] == 1234


# --- crashes ----------------------------------------------------------------------------------------------

def test_failure_while_saving_keeps_history(qtbot, make_window, tmp_path, monkeypatch):
    data = tmp_path / "data"
    w = make_window(data_dir=data, n=3)
    generate(qtbot, w, "kept")
    real = metadata.write_png
    calls = []

    def flaky(path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(path, *args, **kw)
    monkeypatch.setattr(history_mod.metadata, "write_png", flaky)
    w.form.prompt.setPlainText("lost")
    with qtbot.waitSignal(w.job_ended, timeout=TIMEOUT) as ended:
        assert w.generate()
    assert ended.args == ["failed"] and "disk full" in w.banner.text
    assert [t.final for t in w.grid.tiles] == [True] * 3  # the earlier batch is back on screen
    w.close()
    h = History(data)
    assert [b.prompt for b in h.batches()] == ["kept"] and h.check() == []
    assert len(list((data / "images").iterdir())) == 1  # the half-written folder is gone
    h.close()


KILLED = textwrap.dedent("""
    import sys, numpy as np
    from PIL import Image
    from mlx_crepulse import Recipe, Result
    from desktop.history import History
    h = History(sys.argv[1])
    rng = np.random.default_rng(0)
    k = 0
    while True:
        imgs = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(4)]
        recipe = Recipe("p", n=4, seed=k, steps=4, width=256, height=256, model="demo")
        r = Result(imgs, [k + i for i in range(4)], None, np.ones((4, 32), np.float16), recipe, 0.1)
        h.add_batch(r, inputs={"latents": rng.standard_normal((4, 8, 4)).astype(np.float32)})
        k += 4
        print(k // 4, flush=True)
""")


def test_killed_while_saving_loses_nothing_earlier(tmp_path):
    data = tmp_path / "data"
    for delay in (1.5, 2.3):  # killed at two moments of a save loop
        p = subprocess.Popen([sys.executable, "-c", KILLED, str(data)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
        saved = 0
        started = time.time()
        while time.time() - started < 60:
            line = p.stdout.readline()
            if line.strip():
                saved = int(line)
            if saved >= 2 and time.time() - started > delay:
                break
        p.send_signal(signal.SIGKILL)
        p.wait()
        h = History(data)
        assert h.check() == []
        batches = h.batches()
        assert len(batches) >= saved and all(len(b.images) == 4 for b in batches)
        assert all(im.path.is_file() for b in batches for im in b.images)
        assert all(h.inputs(b.id)["latents"].shape == (4, 8, 4) for b in batches)
        h.remove_orphans(older_than=0)
        assert h.check() == [] and h.count() == len(batches)
        folders = {d.name for d in (data / "images").iterdir()}
        assert folders == {b.folder.name for b in batches}
        h.close()


# --- models and the command line -----------------------------------------------------------------------------

def test_memory_check_and_model_messages(qtbot, make_window, tmp_path):
    msg = models.memory_problem("schnell", None, ram_gb=16)
    assert "33 GB" in msg and "16 GB" in msg and "4-bit" in msg
    assert models.memory_problem("schnell", 4, ram_gb=16) is None
    assert models.memory_problem("dev", 8, ram_gb=24) is None
    assert models.memory_problem("demo", None, ram_gb=4) is None
    # FLUX.2 [klein] 4B fits a 16 GB Mac at 8 and 4 bits; in bf16 it does not, and 4-bit is offered
    assert models.memory_problem("klein", 8, ram_gb=16) is None and models.memory_problem("klein", 4, ram_gb=16) is None
    assert "4-bit" in models.memory_problem("klein", None, ram_gb=16)
    assert models.physical_ram_gb() > 0
    assert controls.diversity_of(0) is None and controls.diversity_of(1) == 0 and controls.diversity_of(9) == 1
    # the app's default tick is the CLI's default diversity, so the two make the same batch from one seed
    assert controls.diversity_of(5) == mlx_crepulse.DEFAULT_DIVERSITY == 0.5 and controls.tick_of(0.5) == 5
    w = make_window()
    assert {"klein", "klein-base", "klein-9b"} <= {w.form.model.itemData(i) for i in range(w.form.model.count())}
    w.form.set_source(str(tmp_path / "nowhere"))
    w.update_model_state()
    assert "unknown model" in w.form.model_note.text() or "not" in w.form.model_note.text()
    w.form.prompt.setPlainText("a fox")
    assert w.generate() is False and w.banner.isVisible()
    # a folder that looks like a pipeline but is not complete: the engine's WeightsError, in the window
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    w.form.set_source(str(broken))
    with qtbot.waitSignal(w.job_ended, timeout=TIMEOUT) as ended:
        assert w.generate()
    assert ended.args == ["failed"] and "not a complete FLUX pipeline" in w.banner.text
    assert w.form.generate.isEnabled()


def test_download_reports_progress_and_errors(qtbot, make_window, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the child process must say so clearly
    monkeypatch.setattr(models, "physical_ram_gb", lambda: 64.0)  # else a small machine is refused the download
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 10 ** 15)  # and so is a small disk
    w = make_window()
    if models.availability("schnell") is not None:  # not in the Hugging Face cache
        w.form.set_source("schnell")
        w.update_model_state()
        assert "not downloaded" in w.form.model_note.text() and not w.form.download.isHidden()
    with qtbot.waitSignal(w.downloader.failed, timeout=60_000) as failed:
        w.download("schnell")
        assert "Downloading" in w.progress_label.text() and w.cancel_btn.isEnabled()
    # in the app's words: no environment variable, no terminal command
    assert failed.args == ["No internet connection: the download resumes where it stopped when you try again.",
                           "offline"] and failed.args[0] in w.banner.text
    assert not w.downloader.running and not w.cancel_btn.isEnabled()


def test_screenshot_flag(tmp_path, model_source):
    """--screenshot on a machine without a display (no DISPLAY, no QT_QPA_PLATFORM): Qt draws offscreen
    by itself (it aborted with exit 134), and the picture has the asked size."""
    out = tmp_path / "shot.png"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    r = subprocess.run([sys.executable, "-m", "desktop", "--screenshot", str(out), "--prompt", "a red fox",
                        "--model", model_source, "-n", "2", "--size", "900x600"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with PILImage.open(out) as im:
        assert im.size == (900, 600)


LEAK = textwrap.dedent("""
    import sys
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtWidgets import QApplication
    app = QApplication([])
    image = QImage(8, 8, QImage.Format.Format_RGB32)
    painter = QPainter(image)
    before = sys.getrefcount(None)
    for _ in range(20000):
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    after = sys.getrefcount(None)
    painter.end()
    print(after - before if sys.version_info < (3, 12) else 0)  # the bad combination: -20000
""")


def test_qt_calls_keep_none_alive():
    """The installed PySide6 keeps None's reference count flat across 20,000 Qt calls that return nothing
    (6.12.0 under Python 3.10/3.11 lost one a call: the app aborted with `none_dealloc` after about 16
    batches; pyproject.toml excludes it there). Runs in a child process, as the bad combination aborts."""
    proc = subprocess.run([sys.executable, "-c", LEAK], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert proc.returncode == 0 and abs(int(proc.stdout)) < 100, (proc.returncode, proc.stdout, proc.stderr[-300:])


# --- a long session (issue 20) --------------------------------------------------------------------------------

def test_viewer_and_compare_open_again_and_again(qtbot, make_window):
    """Full view and Compare delete themselves on close; each opens again, three times, and quitting
    afterwards still closes the history (a dead wrapper kept in the window's list broke both)."""
    w = make_window(n=2, steps=2)
    generate(qtbot, w, seed=3)
    a, b = w.batch.images[:2]
    for _ in range(3):
        for dialog in (w.open_viewer(w.grid.items(), 0), w.compare(a, b)):
            assert dialog.isVisible()
            with qtbot.waitSignal(dialog.destroyed, timeout=5000):
                dialog.close()
        assert w.dialogs == []
    w.open_viewer(w.grid.items(), 1)
    w.close()
    assert getattr(w.history._local, "db", None) is None


def test_after_a_batch_keys_go_to_the_grid(qtbot, make_window):
    """When a batch finishes the grid has the focus: S stars the current image and the prompt keeps its
    text (the keys used to be typed into the prompt and saved with it). History follows the new batch."""
    w = make_window(n=2, steps=2)
    first = generate(qtbot, w, prompt="a red circle", seed=1)
    second = generate(qtbot, w, prompt="a red circle", seed=2)
    assert w.grid.hasFocus()
    qtbot.keyClick(w.grid, Qt.Key.Key_S)
    assert w.form.prompt_text() == "a red circle"
    assert w.history_view.current_batch().id == second != first


def test_diversity_words_follow_the_slider():
    """One word a position, and the word printed under the middle of the slider is the middle's own."""
    words = [controls.diversity_words(t) for t in range(1, controls.DIVERSITY_TICKS + 1)]
    assert len(set(words)) == len(words)
    assert controls.diversity_words(controls.DEFAULT_TICK) == "moderate"


def test_choosing_a_folder_asks_once(qtbot, make_window, tmp_path, monkeypatch):
    """Picking "Choose a folder..." opens one dialog, and the folder becomes the model."""
    w = make_window()
    asked = []
    folder = tmp_path / "some-model"
    folder.mkdir()
    monkeypatch.setattr(controls.QFileDialog, "getExistingDirectory", lambda *a: asked.append(1) or str(folder))
    w.form.model.setCurrentIndex(w.form.model.findData("__folder__"))
    assert asked == [1] and w.form.source() == str(folder)


def test_use_settings_leaves_the_seed_random(qtbot, make_window):
    """Use settings puts the prompt, model and batch size in the form, the seed back to random and the
    steps and size to the model's defaults (they were written in, and every later batch was the same)."""
    w = make_window(n=2, steps=2)
    generate(qtbot, w, prompt="a blue square", seed=5)
    w.form.prompt.setPlainText("something else")
    w.form.steps.setValue(0)
    w.use_settings(w.batch)
    assert w.form.prompt_text() == "a blue square" and w.form.n.value() == 2
    assert w.form.seed.value() == -1 and w.form.width_.value() == 0 and w.form.height_.value() == 0


def test_form_has_what_a_flux_user_expects(qtbot, make_window):
    """Negative prompt, guidance and true CFG go into the Recipe (0: the model's default); a shape
    preset keeps the model's area in multiples of 16, and "model default" clears the size."""
    w = make_window(n=2)
    w.form.prompt.setPlainText("a red circle")
    w.form.negative.setText("blue")
    w.form.true_cfg.setValue(3.0)
    r = w.form.recipe()
    assert (r.negative_prompt, r.true_cfg, r.guidance) == ("blue", 3.0, None)
    w.form.set_model_size(1024, 1024)
    w.form._aspect_chosen(w.form.aspect.findText("wide 16:9"))
    width, height = w.form.width_.value(), w.form.height_.value()
    assert width % 16 == 0 and height % 16 == 0 and width > height
    assert abs(width * height - 1024 * 1024) / (1024 * 1024) < 0.05 and abs(width / height - 16 / 9) < 0.05
    w.form._aspect_chosen(0)
    assert w.form.width_.value() == 0 and w.form.recipe().width is None


def test_menus_toolbar_twin_and_blend_row(qtbot, make_window):
    """Every action is in the menu bar with its shortcut; the image toolbar is no longer in the tab bar's
    corner, so at 1000 px both tabs keep their names; "Diversity off" remakes a batch with the same seeds
    and no method; the blend dialog offers a row of seven alphas by default."""
    from desktop.blend import ROW, BlendDialog

    w = make_window(n=2, steps=2)
    w.resize(1000, 700)
    assert w.tabs.cornerWidget(Qt.Corner.TopRightCorner) is None
    assert [w.tabs.tabText(i) for i in range(w.tabs.count())] == ["Batch", "History", "Favourites"]
    menu_actions = {a.text() for m in w.menuBar().actions() for a in m.menu().actions()}
    assert {"Generate", "Vary subtly", "Blend\u2026", "Diversity off", "Compare", "Quit"} <= menu_actions
    first = generate(qtbot, w, seed=4)
    twin = run(qtbot, w, w.twin)
    t, f = w.history.batch(twin), w.history.batch(first)
    assert t.kind == "twin" and t.recipe["method"] is None and f.recipe["method"] is not None
    assert [im.seed for im in t.images] == [im.seed for im in f.images]
    dlg = BlendDialog(f.images[0], [f.images[1]], w)
    assert dlg.alphas == list(ROW) and len(ROW) == 7
    dlg.row.setChecked(False)
    assert dlg.alphas == [dlg.alpha]


def test_loras_from_the_form_are_applied_and_recorded(qtbot, make_window, tmp_path, model_source):
    """A LoRA added in the form (a file, scale 0.5) is applied to the batch and recorded in its recipe
    (file, scale, SHA-256); Run again applies it again and makes the same images; a batch without it
    differs."""
    from tests import lora_files
    from mlx_crepulse import weights

    folder = weights.DEMO_DIR if model_source == "demo" else Path(model_source)
    path = lora_files.make(folder, tmp_path / "style.safetensors", seed=21, text_encoder=False, std=0.3)
    w = make_window(n=2, steps=2)
    w.form._add_lora(str(path), 0.5)
    with_lora = generate(qtbot, w, prompt="a red circle", seed=9)
    (rec,) = w.history.batch(with_lora).recipe["loras"]
    assert rec["file"] == "style.safetensors" and rec["scale"] == 0.5
    again = run(qtbot, w, lambda: w.run_again(w.history.batch(with_lora)))
    w.form.lora_list.clear()
    plain = generate(qtbot, w, prompt="a red circle", seed=9)
    a, b, c = (w.history.batch(i).images[0].path for i in (with_lora, again, plain))
    assert np.abs(pixels(a) - pixels(b)).max() <= 1 and np.abs(pixels(a) - pixels(c)).max() > 1
    assert w.history.batch(plain).recipe["loras"] == []


def test_lineage_favourites_and_right_click(qtbot, make_window):
    """A variation's header links to its parent image and the parent batch's header links back to the
    variation batch (following a link shows that batch, the image selected); the Favourites tab shows
    every starred image; right-clicking a tile selects it and offers the image actions."""
    w = make_window(n=2, steps=2)
    parent = generate(qtbot, w, seed=6)
    w.grid.select(1)
    w.grid.toggle_star()
    child = run(qtbot, w, lambda: w.vary(refine.STRONG))
    assert f'href="image:{w.history.batch(parent).images[1].id}"' in w.info.text()
    w._follow(f"image:{w.history.batch(parent).images[1].id}")
    assert w.batch.id == parent and w.grid.current == 1 and f'href="batch:{child}"' in w.info.text()
    w._follow(f"batch:{child}")
    assert w.batch.id == child
    w.tabs.setCurrentIndex(2)
    assert [im.id for im in w.favourites.items()] == [w.history.batch(parent).images[1].id]
    assert w.selected_image().id == w.history.batch(parent).images[1].id
    w.tabs.setCurrentIndex(0)
    qtbot.mouseClick(w.grid.tiles[1], Qt.MouseButton.RightButton)
    assert w.grid.current == 1
    assert {"Vary subtly", "Blend\u2026", "Diversity off"} <= {a.text() for a in w.grid.actions()}


def test_thirty_batches_keep_none_alive(qtbot, make_window):
    """Thirty batches in one run of the app (generate, previews, grid, history) lose no reference to None:
    with PySide6 6.12.0 on Python 3.11 the count fell by about 900 a batch until None was freed and the app
    aborted. (It may rise: new batches' recipes and widgets hold Nones of their own.)"""
    w = make_window(n=2, steps=1)
    generate(qtbot, w, seed=0)  # warm: the first batch fills caches
    before = sys.getrefcount(None)
    for k in range(1, 31):
        generate(qtbot, w, prompt="a red circle", seed=k)
    change = sys.getrefcount(None) - before
    assert sys.version_info >= (3, 12) or change > -100, change  # 3.12+: None is immortal


def hover(tile):
    """The pointer entering a tile, as Qt delivers it (offscreen platforms send no enter events of their own)."""
    from PySide6.QtCore import QPointF
    from PySide6.QtGui import QEnterEvent
    from PySide6.QtWidgets import QApplication
    centre = QPointF(tile.rect().center())
    QApplication.sendEvent(tile, QEnterEvent(centre, centre, QPointF(tile.mapToGlobal(centre.toPoint()))))


def test_hover_bar_runs_the_image_actions(qtbot, make_window):
    """The bar on a hovered tile does what the menu does, on that tile's image: star, vary, open; it
    shows only on hover and a click elsewhere on the image only selects."""
    from desktop.grid import BAR
    w = make_window(n=3)
    batch_id = generate(qtbot, w)
    tile = w.grid.tiles[2]
    assert tile.button_at(tile.button_rects()[1][1].center()) == ""  # no bar without the pointer
    hover(tile)
    assert [name for name, _ in tile.button_rects()] == [name for name, _ in BAR]
    rect = dict(tile.button_rects())
    assert all(tile.image_rect().contains(r) for r in rect.values())  # on the image, every button whole
    qtbot.mouseClick(tile, Qt.MouseButton.LeftButton, pos=rect["star"].center())
    assert w.grid.current == 2 and w.history.image(tile.item.id).starred  # selected and starred
    qtbot.mouseClick(tile, Qt.MouseButton.LeftButton, pos=rect["view"].center())
    assert len(w.dialogs) == 1 and isinstance(w.dialogs[0], Viewer) and w.dialogs[0].index == 2
    w.dialogs[0].close()
    qtbot.waitUntil(lambda: not w.dialogs, timeout=5000)  # deleted on close, a moment later
    parent = tile.item.id
    qtbot.mouseClick(w.grid.tiles[0], Qt.MouseButton.LeftButton, pos=w.grid.tiles[0].rect().center())
    assert w.grid.current == 0 and not w.dialogs  # a plain click selects, nothing more
    hover(w.grid.tiles[2])
    new = run(qtbot, w, lambda: qtbot.mouseClick(w.grid.tiles[2], Qt.MouseButton.LeftButton,
                                                 pos=rect["subtle"].center()) or w.job is not None)
    b = w.history.batch(new)
    assert new != batch_id and b.kind == refine.SUBTLE.kind and b.parent_image == parent


def test_queue_runs_batches_in_order(qtbot, make_window):
    """While a batch runs, Generate and the refinements queue the next ones; each runs in turn when the one
    before ends, a cancel stops only the running one, and Clear queue drops the waiting ones."""
    w = make_window(n=2)
    first = generate(qtbot, w, "a red circle")
    ended = []
    w.job_ended.connect(ended.append)
    w.form.prompt.setPlainText("a blue square")
    assert w.generate()
    assert w.form.generate.isEnabled() and w.form.generate.text() == "Add to queue"
    # the Batch tab shows the running batch's previews: no batch there to explore or twin yet
    assert not w.actions_["twin"].isEnabled() and not w.actions_["explore"].isEnabled()
    w.form.prompt.setPlainText("a green triangle")
    assert w.generate()
    w.tabs.setCurrentIndex(1)  # History: the red circle's batch is selected there
    assert w.actions_["twin"].isEnabled() and w.twin()
    assert len(w.queue) == 2 and w.queue_label.text() == "2 waiting" and not w.clear_queue_btn.isHidden()
    qtbot.waitUntil(lambda: len(ended) == 3 and w.job is None, timeout=3 * TIMEOUT)
    assert ended == ["finished"] * 3 and not w.queue and w.queue_label.isHidden()
    made = [b for b in reversed(w.history.batches()) if b.id > first]
    assert [(b.prompt, b.kind) for b in made] == [("a blue square", "generate"), ("a green triangle", "generate"),
                                                  ("a red circle", "twin")]
    assert w.form.generate.text() == "Generate"
    # a cancel stops the running batch and the queue goes on; Clear queue drops what waits
    ended.clear()
    w.form.steps.setValue(60)
    assert w.generate() and w.generate() and w.generate()
    assert len(w.queue) == 2
    w.cancel()
    qtbot.waitUntil(lambda: len(ended) == 1, timeout=TIMEOUT)
    assert ended == ["cancelled"]
    qtbot.waitUntil(lambda: w.job is not None, timeout=5000)  # the next one started by itself
    assert len(w.queue) == 1
    w.clear_queue()
    assert not w.queue and w.queue_label.isHidden()
    w.cancel()
    qtbot.waitUntil(lambda: w.job is None and not w.engine.busy, timeout=TIMEOUT)
    assert ended == ["cancelled", "cancelled"] and w.history.batches()[0].id == made[-1].id


def test_recent_prompts_and_time_estimate(qtbot, make_window):
    """The prompt box offers the prompts used before, newest first, once each; the form says how long a
    batch will take from this model's measured speed (nothing to go on before its first batch)."""
    w = make_window(n=2)
    assert w.form.estimate.text().startswith("Time: known after the first batch")
    for prompt in ("a red circle", "a blue square", "a red circle"):
        generate(qtbot, w, prompt)
    menu = w.form.recent.menu()
    menu.aboutToShow.emit()
    assert [a.text() for a in menu.actions()] == ["a red circle", "a blue square"]
    menu.actions()[1].trigger()
    assert w.form.prompt_text() == "a blue square"
    b = w.history.batches()[0]
    shown = w.form.estimate.text()
    assert shown.startswith(("About ", "Under a second")) and "loading" not in shown  # the model is loaded
    assert [estimate.describe(t, False) for t in (0.4, 12.3, 600)] == ["Under a second", "About 12 s", "About 10 min"]
    expected = estimate.seconds(w.form.recipe().to_dict() | {"steps": b.recipe["steps"], "width": b.recipe["width"],
                                                                "height": b.recipe["height"]}, w.history.batches())
    assert expected is not None and expected > 0
    w.form.n.setValue(4)  # twice the images: twice the estimate
    again = estimate.seconds(w.form.recipe().to_dict() | {k: b.recipe[k] for k in ("steps", "width", "height")},
                             w.history.batches())
    assert again == pytest.approx(2 * expected)


def test_estimate_scales_measured_speed():
    """Closed form: batches that took exactly `speed` seconds per unit of work give back speed x work for a
    new batch; repelled batches are judged by repelled ones; another model or precision tells nothing."""
    from desktop.history import Batch

    def batch(i, seconds, model="m", quantize=None, method=None, **r):
        recipe = dict(model=model, quantize=quantize, method=method, steps=4, width=256, height=256, n=2,
                      max_sequence_length=64, true_cfg=1.0) | r
        return Batch(i, 0.0, "p", model, "generate", None, Path("."), recipe, False, seconds)
    unit = 4 * 2 * (256 * 256 / 256 + 64)
    past = [batch(3, 3.0 * unit, method={"name": "contextual"}), batch(2, 1.0 * unit), batch(1, 1.0 * unit),
            batch(0, 9.0, model="other")]
    plain = dict(model="m", quantize=None, method=None, steps=8, width=512, height=512, n=3, max_sequence_length=64,
                 true_cfg=2.0)
    assert estimate.seconds(plain, past) == pytest.approx(8 * 3 * 2 * (512 * 512 / 256 + 64))
    repelled = plain | {"method": {"name": "contextual"}}
    assert estimate.seconds(repelled, past) == pytest.approx(3.0 * 8 * 3 * 2 * (512 * 512 / 256 + 64))
    defaults = dict(plain, steps=None, width=None, height=None, true_cfg=None)  # the latest batch's settings
    assert estimate.seconds(defaults, past) == pytest.approx(4 * 3 * (256 * 256 / 256 + 64))
    assert estimate.seconds(plain | {"quantize": 4}, past) is None
    assert estimate.seconds(plain | {"model": "new"}, past) is None


def test_edit_menu_copies_and_settings_turn_previews_off(qtbot, make_window):
    """The menu bar is File, Edit, Image, View, Help. The grid's keys are shortcuts the menus show (S
    stars), and typed in the prompt they stay text. Copy Image puts the PNG's own pixels on the
    clipboard, Copy Prompt and Settings the text chunk the PNG carries. Settings turns previews off for
    the next batch, and the choice is kept for the next window."""
    from PySide6.QtGui import QGuiApplication, QImage
    from desktop.settings import SettingsDialog
    from mlx_crepulse import metadata

    w = make_window(n=2)
    assert [a.text() for a in w.menuBar().actions()] == ["&File", "&Edit", "&Image", "&View", "&Help"]
    assert w.actions_["star"].shortcut().toString() == "S" and w.actions_["settings"].shortcut().toString() == "Ctrl+,"
    listed = w.shortcuts_text()  # Help > Keyboard Shortcuts: every action that has a key, and the grid's keys
    for a in w.actions_.values():
        assert a.shortcut().isEmpty() or a.text().replace("&", "") in listed, a.text()
    assert "Arrows" in listed and "Space" in listed
    w.actions_["next_tab"].trigger()
    assert w.tabs.currentIndex() == 1
    w.actions_["previous_tab"].trigger()
    w.actions_["previous_tab"].trigger()
    assert w.tabs.currentIndex() == 2
    w.tabs.setCurrentIndex(0)
    batch = w.history.batch(generate(qtbot, w, "a red circle", seed=7))
    assert w.grid.hasFocus() and w.grid.current == 0
    qtbot.keyClick(w.grid, Qt.Key.Key_S)
    assert [im.starred for im in w.history.batch(batch.id).images] == [True, False]  # once, not toggled twice
    w.form.prompt.setFocus()
    qtbot.keyClick(w.form.prompt, Qt.Key.Key_End, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClick(w.form.prompt, Qt.Key.Key_S)
    assert w.form.prompt_text() == "a red circles" and w.history.batch(batch.id).images[0].starred
    w.grid.setFocus()
    qtbot.keyClick(w.grid, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    copied = QGuiApplication.clipboard().image().convertToFormat(QImage.Format.Format_RGB888)
    assert not copied.isNull() and copied == QImage(str(batch.images[0].path)).convertToFormat(QImage.Format.Format_RGB888)
    assert w.copy_parameters()
    text = QGuiApplication.clipboard().text()
    assert text == metadata.read_text_chunks(batch.images[0].path)["parameters"]
    assert text.startswith("a red circle") and f"Seed: {batch.images[0].seed}" in text
    dlg = SettingsDialog(w.settings, w.engine, w.history.folder, w.login, w)
    qtbot.addWidget(dlg)
    from PySide6.QtWidgets import QLabel
    assert str(w.history.folder) in [label.text() for label in dlg.findChildren(QLabel)]
    try:
        dlg.previews.setChecked(False)
        assert w.engine.previews is False
        with collecting(w.engine.preview) as shown:
            generate(qtbot, w, "a blue square")
        assert shown == []
        w.close()
        again = make_window(n=2)  # the same settings file
        assert again.engine.previews is False
    finally:
        w.engine.previews = True


def test_macos_keeps_its_native_style(qapp):
    """The dark Fusion theme is for Linux and Windows; on macOS the app keeps the platform's own style
    and palette (so the system's light or dark appearance)."""
    from PySide6.QtWidgets import QApplication
    from desktop.window import apply_theme

    apply_theme(qapp, platform="linux")
    themed = QApplication.palette()
    try:
        qapp.setStyle("Windows")  # stands in for the platform's own style, which Linux lacks
        qapp.setPalette(QApplication.style().standardPalette())
        native = QApplication.palette()
        assert native != themed
        apply_theme(qapp, platform="darwin")
        assert QApplication.style().name().lower() == "windows" and QApplication.palette() == native
    finally:
        apply_theme(qapp, platform="linux")
    assert QApplication.style().name().lower() == "fusion" and QApplication.palette() == themed
