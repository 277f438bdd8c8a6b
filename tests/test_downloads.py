"""Downloading a model from the app: the disk checked first, the memory warning not hidden behind
"not downloaded", a Hugging Face login inside the app, and failures said in an app user's words.

Offline throughout: the Hugging Face cache is a tmp folder, the Hub's answers are monkeypatched, and no
child process or network call is made unless a test says so.
"""

import os
from types import SimpleNamespace

import pytest

from mlx_crepulse import hub, weights

GB = 10 ** 9


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path/hf/hub (it does not exist yet, as on a new machine)."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time, so patched
    return cache


def fake_blob(cache, repo, size):
    """A partial download of `repo` in the cache: one blob of `size` bytes (sparse, so instant)."""
    blobs = cache / ("models--" + repo.replace("/", "--")) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    with open(blobs / "abc.incomplete", "wb") as f:
        f.truncate(size)


def hub_error(cls, message="401 Client Error"):
    """A huggingface_hub HTTP error as its HTTP layer raises it (it wants a response with headers)."""
    return cls(message, response=SimpleNamespace(headers={}, request=None))


# --- the disk check ---------------------------------------------------------------------------------------

def test_free_bytes_measures_the_nearest_existing_folder(hf_cache):
    """Before the first download the cache folder does not exist; its disk's free space is still read
    (from the nearest existing ancestor) and is the free space of tmp_path's disk."""
    assert not hf_cache.exists()
    free = hub.free_bytes()
    assert free > 0 and abs(free - hub.free_bytes(hf_cache.parents[1])) < 100 * 10 ** 6


def test_disk_problem_counts_what_is_cached_already(hf_cache):
    """10 GB to fetch with 5 GB free is a problem naming both numbers and the cache folder; with 8 GB
    of it already in the cache (a stopped download), 5 GB free is enough."""
    repo = "someone/model"
    msg = hub.disk_problem(repo, 10 * GB, free=5 * GB)
    assert msg and "11.0 GB needed" in msg and "5.0 GB free" in msg and str(hf_cache) in msg
    fake_blob(hf_cache, repo, 8 * GB)
    assert hub.disk_problem(repo, 10 * GB, free=5 * GB) is None
    assert hub.disk_problem(repo, 10 * GB, free=2 * GB)  # 2 GB left to fetch plus the margin


def test_hub_main_refuses_a_full_disk_before_fetching(hf_cache, monkeypatch, capsys):
    """`python -m mlx_crepulse.hub REPO` prints the total, then `error disk ...` and exits DISK_FULL
    without calling the download at all when the disk is too small."""
    monkeypatch.setattr(hub, "download_size", lambda repo: 30 * GB)
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 4 * GB)
    monkeypatch.setattr(weights, "download", lambda *a, **k: pytest.fail("downloaded despite a full disk"))
    assert hub.main(["someone/model"]) == hub.DISK_FULL == 3
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"total {30 * GB}" and out[1].startswith("error disk Not enough disk space: 31.0 GB needed")


def test_hub_main_skips_the_disk_check_when_the_size_is_unknown(hf_cache, monkeypatch, capsys):
    """Offline the Hub cannot say the size: no total, no disk check (even on a 'full' disk), and the
    download's own failure is printed with its kind first."""
    def no_network(repo):
        raise ConnectionError("no route to host")

    def offline_download(repo, progress=True):
        raise weights.WeightsError("cannot reach the Hub (HF_HUB_OFFLINE=unset)", kind="offline")
    monkeypatch.setattr(hub, "download_size", no_network)
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 0)
    monkeypatch.setattr(weights, "download", offline_download)
    assert hub.main(["someone/model"]) == 2
    assert capsys.readouterr().out == "error offline cannot reach the Hub (HF_HUB_OFFLINE=unset)\n"


def test_cli_download_refuses_a_full_disk_before_fetching(hf_cache, monkeypatch, capsys):
    """`mlx-crepulse download` checks the disk as the app does: exit 2, one line naming the sizes and
    what to do, and no download started."""
    from mlx_crepulse import cli
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "download_size", lambda repo: 30 * GB)
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 4 * GB)
    monkeypatch.setattr(weights, "download", lambda *a, **k: pytest.fail("downloaded despite a full disk"))
    assert cli.main(["download", "someone/model", "--quiet"]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and "31.0 GB needed, 4.0 GB free" in said[0] and "HF_HOME" in said[0]


# --- the kinds of download failure ------------------------------------------------------------------------

@pytest.mark.parametrize("raised, kind", [
    ("gated", "gated"), ("missing", "missing"), ("local", "offline"), ("connection", "offline"),
    ("disk", "disk"), ("other", None)])
def test_download_failures_have_a_kind(raised, kind, hf_cache, monkeypatch):
    """weights.download keeps its CLI message and tags it with a kind the app can word: a gated repo,
    no such repo, the cache lacking the files offline, the network failing mid-way, a full disk."""
    import errno

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    errors = {"gated": hub_error(GatedRepoError), "missing": hub_error(RepositoryNotFoundError),
              "local": LocalEntryNotFoundError("not cached"), "connection": ConnectionError("reset by peer"),
              "disk": OSError(errno.ENOSPC, "No space left on device"), "other": RuntimeError("odd")}

    def snapshot_download(*a, **k):
        raise errors[raised]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(weights.WeightsError) as e:
        weights.download("someone/model", progress=False)
    assert e.value.kind == kind and "someone/model" in str(e.value)
    if raised == "gated":  # the CLI's words are unchanged
        assert "hf auth login" in str(e.value)


# --- the window: what it offers, and what it refuses --------------------------------------------------------

pytest.importorskip("pytestqt")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings  # noqa: E402

from desktop import login as login_mod, models, window as window_mod, worker  # noqa: E402
from desktop.login import LoginDialog  # noqa: E402
from mlx_crepulse import Recipe  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def engine_thread():
    yield
    worker.shutdown()


@pytest.fixture
def win(qtbot, tmp_path, hf_cache, monkeypatch):
    """A window on an empty Hugging Face cache, a 64 GB machine and 1 TB free unless a test says otherwise;
    `w.asked` records every question (answered No); a download that starts, or a job that reaches the engine,
    fails the test."""
    monkeypatch.setattr(models, "physical_ram_gb", lambda: 64.0)
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 1000 * GB)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = window_mod.MainWindow(data_dir=tmp_path / "data", settings=settings)  # the real engine thread
    monkeypatch.setattr(w.engine, "submit", lambda job, history: pytest.fail("a job reached the engine"))
    qtbot.addWidget(w)
    w.asked = []
    w.ask = lambda title, text: w.asked.append(text) and False
    monkeypatch.setattr(w.downloader, "start", lambda repo: pytest.fail(f"download of {repo} started"))
    w.form.prompt.setPlainText("a lighthouse at dusk")
    w.show()  # the banner's text counts only while it is on screen
    qtbot.waitExposed(w)
    return w


def test_too_big_for_this_machine_is_said_and_nothing_is_offered(win, monkeypatch):
    """On an 8 GB machine FLUX.1-schnell does not fit even at 4-bit: the model note says so (not just
    "not downloaded") and offers no Download; Generate neither asks nor downloads, and the banner names a
    model that fits."""
    monkeypatch.setattr(models, "physical_ram_gb", lambda: 8.0)
    win.form.set_source("schnell")
    win.update_model_state()
    note = win.form.model_note.text()
    assert "too big for this machine" in note and "10 GB" in note and "8 GB" in note
    assert win.form.download.isHidden()
    assert win.generate() is False
    assert win.asked == [] and "too big" in win.banner.text and "FLUX.2 [klein] 4B" in win.banner.text


def test_a_full_disk_is_said_instead_of_offering_the_download(win, monkeypatch):
    """With 2 GB free, Generate on schnell asks nothing and says how much space is needed and free, and
    where; the Download button says the same and starts nothing."""
    monkeypatch.setattr(hub, "free_bytes", lambda path=None: 2 * GB)
    win.form.set_source("schnell")
    assert win.generate() is False
    assert win.asked == []
    assert "Not enough disk space: 34.7 GB needed, 2.0 GB free" in win.banner.text
    win.banner.hide()
    win.download("schnell")
    assert "Not enough disk space" in win.banner.text


@pytest.mark.parametrize("source, size", [("schnell", "about 34 GB"), ("klein-9b", "about 35 GB"),
                                          ("klein", "about 16 GB")])
def test_the_download_question_names_the_download_size(win, source, size):
    """The question before a download gives the size of the files (not the memory the model needs:
    33 GB for schnell, 32 GB for klein 9B), and answering No downloads nothing."""
    win.form.set_source(source)
    assert win.generate() is False
    assert len(win.asked) == 1 and size in win.asked[0]


def test_download_sizes_fit_the_memory_table():
    """Every built-in Hub model has a download size, and the bf16 memory it needs is near it (the weights
    are most of both): a typo in either table shows here."""
    for source, _ in models.CHOICES:
        if source != models.DEMO:
            assert 0.85 < models.needs_gb(source, None) / models.download_gb(source) < 1.1, source


def child_said(w, repo, out, code):
    """What the window shows when the download child printed `out` and exited with `code`."""
    w.downloader.repo, w.downloader._out = repo, out
    w.downloader._report(code)
    return w.banner.text


def test_download_failures_in_app_words(win):
    """The child's `error KIND` lines become plain sentences with no environment variable or command; the
    child's own disk message is passed on as it is."""
    offline = child_said(win, "black-forest-labs/FLUX.1-schnell", "error offline black-forest-labs/FLUX.1-schnell "
                         "is not in the Hugging Face cache (HF_HUB_OFFLINE=unset); fetch it with `python -m "
                         "mlx_crepulse download schnell`\n", 2)
    assert offline.startswith("No internet connection") and "resumes" in offline
    disk = child_said(win, "someone/model", f"total {40 * GB}\nerror disk Not enough disk space: 41.0 GB needed, "
                      "3.0 GB free in /x\n", hub.DISK_FULL)
    assert disk == "Not enough disk space: 41.0 GB needed, 3.0 GB free in /x"
    full = child_said(win, "someone/model", "error disk could not download someone/model: [Errno 28] No space\n", 2)
    assert full.startswith("Not enough disk space") and "Errno" not in full
    for text in (offline, disk, full):
        assert "HF_HUB" not in text and "python -m" not in text and "`" not in text


def test_a_gated_model_asks_for_the_licence_and_offers_the_login(win, qtbot, monkeypatch):
    """A gated download's banner names the model's Hub page and the login, and its button opens the login
    (a dialog faked here: it answers at once); once logged in, the banner goes."""
    text = child_said(win, "black-forest-labs/FLUX.1-dev", "error gated black-forest-labs/FLUX.1-dev is gated: "
                      "accept its licence on huggingface.co and log in with `hf auth login`, then try again\n", 2)
    assert "FLUX.1-dev" in text and "https://huggingface.co/black-forest-labs/FLUX.1-dev" in text
    assert "log in" in text and "hf auth" not in text
    # the licence page is a link a click opens (a sentence's full stop is not part of it)
    assert '<a href="https://huggingface.co/black-forest-labs/FLUX.1-dev">' in win.banner.label.text()
    assert win.banner.label.openExternalLinks()
    button = win.banner.action_btn
    assert not button.isHidden() and button.text() == "Log in to Hugging Face\u2026"
    opened = []

    class Answered:
        user = "tester"

        def __init__(self, parent):
            opened.append(parent)

        def exec(self):
            return 1
    monkeypatch.setattr(window_mod, "LoginDialog", Answered)
    button.click()
    assert opened == [win] and not win.banner.isVisible()
    assert "tester" in win.statusBar().currentMessage()
    # any other failure has no button
    child_said(win, "someone/model", "error missing no model 'someone/model'\n", 2)
    assert win.banner.action_btn.isHidden()


def test_login_is_in_the_file_menu(win):
    """File > Log in to Hugging Face… is where the banners point."""
    file_menu = win.menuBar().actions()[0].menu()
    assert "Log in to Hugging Face\u2026" in [a.text() for a in file_menu.actions()]


@pytest.mark.parametrize("offline", [True, False])
def test_a_model_gone_from_the_cache_fails_in_app_words(offline, hf_cache, monkeypatch):
    """The engine loading schnell with an empty cache (it vanished after the window checked) fails at
    once with a plain sentence, not the CLI's HF_HUB_OFFLINE and `python -m` advice; online it does not
    download it on the engine thread either (gigabytes with no progress and no cancel)."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1") if offline else monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(weights, "download", lambda *a, **k: pytest.fail("downloaded on the engine thread"))
    runner, failed = worker._Runner(), []
    runner.failed.connect(lambda message, kind: failed.append((message, kind)))
    runner.run(worker.Job(Recipe(prompt="a fox", model="schnell")), None)
    assert failed == [("FLUX.1-schnell is no longer in the download folder: download it again with the "
                       "Download button.", "weights")]


# --- the login dialog -------------------------------------------------------------------------------------

GOOD = "hf_good_token_0123456789"


@pytest.fixture
def token_store(tmp_path, monkeypatch):
    """huggingface_hub's token store in tmp_path, and a fake huggingface.co that knows one token."""
    import huggingface_hub
    from huggingface_hub import constants, hf_api
    from huggingface_hub.errors import HfHubHTTPError
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # both read at import time
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))

    def whoami(token=None, **k):
        if token != GOOD:
            raise hub_error(HfHubHTTPError, "401 Client Error: Unauthorized (Invalid user token)")
        return {"name": "tester", "auth": {"accessToken": {"displayName": "app", "role": "read"}}}
    monkeypatch.setattr(hf_api, "whoami", whoami)  # huggingface_hub.login checks the token with it too
    return SimpleNamespace(whoami=whoami, get=huggingface_hub.get_token, file=home / "token")


def test_a_good_token_is_saved_where_huggingface_hub_reads_it(qtbot, token_store):
    """OK with a good token closes the dialog and saves the token: huggingface_hub.get_token returns it.
    The token is typed in a password field."""
    dlg = LoginDialog(verify=token_store.whoami)
    qtbot.addWidget(dlg)
    assert "huggingface.co/settings/tokens" in dlg.findChildren(login_mod.QLabel)[0].text()
    assert dlg.token.echoMode() == login_mod.QLineEdit.EchoMode.Password
    assert token_store.get() is None
    dlg.token.setText(GOOD)
    dlg.submit()
    qtbot.waitUntil(lambda: dlg.result() == LoginDialog.DialogCode.Accepted)
    assert dlg.user == "tester" and token_store.get() == GOOD


def test_a_bad_token_or_no_network_says_so_and_saves_nothing(qtbot, token_store):
    """A refused token, and a network failure, each keep the dialog open with a plain sentence, and no
    token file appears."""
    dlg = LoginDialog(verify=token_store.whoami)
    qtbot.addWidget(dlg)
    dlg.token.setText("hf_wrong")
    dlg.submit()
    qtbot.waitUntil(lambda: "did not accept this token" in dlg.error.text())
    assert not dlg.error.isHidden() and dlg.ok.isEnabled()

    def unreachable(token):
        raise ConnectionError("[Errno -3] Temporary failure in name resolution")
    dlg.verify = unreachable
    dlg.token.setText(GOOD)
    dlg.submit()
    qtbot.waitUntil(lambda: dlg.error.text().startswith("Could not reach huggingface.co"))
    assert not token_store.file.exists() and token_store.get() is None
    assert dlg.result() != LoginDialog.DialogCode.Accepted


def test_the_token_check_does_not_freeze_the_window(qtbot, token_store):
    """While huggingface.co takes its time the dialog keeps answering (the check runs on a thread): it
    says it is checking and OK cannot be pressed twice; the answer then closes it."""
    import threading
    release = threading.Event()

    def slow(token):
        release.wait(10)
        return token_store.whoami(token)
    dlg = LoginDialog(verify=slow)
    qtbot.addWidget(dlg)
    dlg.token.setText(GOOD)
    dlg.submit()  # returns at once, the check still waiting
    assert "Checking" in dlg.error.text() and not dlg.ok.isEnabled()
    release.set()
    qtbot.waitUntil(lambda: dlg.result() == LoginDialog.DialogCode.Accepted)
    # Cancel while the check runs: nothing is saved, even when the token turns out good
    token_store.file.unlink()
    release.clear()
    dlg = LoginDialog(verify=slow)
    qtbot.addWidget(dlg)
    dlg.token.setText(GOOD)
    dlg.submit()
    dlg.reject()
    release.set()
    dlg.check.join(10)
    assert not token_store.file.exists() and token_store.get() is None
