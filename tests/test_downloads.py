"""Downloading a model from the app: the disk checked first, the memory warning not hidden behind
"not downloaded", a Hugging Face login inside the app, and failures said in an app user's words.

Offline throughout: the Hugging Face cache is a tmp folder, the Hub's answers are monkeypatched, and no
child process or network call is made unless a test says so.
"""

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
