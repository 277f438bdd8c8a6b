"""The Hugging Face Hub as the app and the CLI see it: which repo a model name means, whether a whole
pipeline is in the cache, how big a download is and how much of it has arrived.

`python -m mlx_crepulse.hub REPO` downloads REPO, printing `total BYTES` first and `done FOLDER` at the
end, or `error KIND MESSAGE` (KIND one of WeightsError's kinds, or "other"; exit 2, or DISK_FULL before
anything is fetched when the disk cannot hold what is left): the app runs it as a child process, which
can be stopped at once and resumes where it stopped, and words each kind of failure for its users.
"""

import fnmatch
import shutil
import sys
from pathlib import Path
from typing import Optional

from . import weights


network_error = weights.network_error  # the app tells a failing network apart with it


def repo_id(source: str) -> Optional[str]:
    """The Hub repo id a model name means (schnell, dev, owner/name); None for the demo and folders."""
    if source == "demo" or Path(source).expanduser().exists():
        return None
    repo = weights.ALIASES.get(source, source)
    return repo if weights.is_repo_id(repo) else None


def is_downloaded(repo: str) -> bool:
    """Whether the cache holds everything a pipeline needs from `repo` (every shard its indexes list)."""
    from .model_folder import ModelFolder
    try:
        ModelFolder.open(str(weights.cached_snapshot(repo)))
        return True
    except weights.WeightsError:
        return False


def download_size(repo: str) -> int:
    """Bytes of the files a pipeline needs from `repo`, as the Hub announces them (needs the network)."""
    from huggingface_hub import HfApi
    info = HfApi().model_info(repo, files_metadata=True)
    return sum(s.size or 0 for s in info.siblings
               if any(fnmatch.fnmatch(s.rfilename, p) for p in weights.HUB_PATTERNS))


def cached_bytes(repo: str) -> int:
    """Bytes of `repo` in the Hugging Face cache so far (partial downloads included)."""
    from huggingface_hub import constants
    blobs = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "blobs"
    if not blobs.is_dir():
        return 0
    return sum(f.stat().st_size for f in blobs.iterdir() if f.is_file())


GB = 1e9
DISK_MARGIN = 1 * GB  # room left over: the cache's small files, and the rest of the system
DISK_FULL = 3  # main's exit code when the disk is too small: nothing was fetched


def cache_dir() -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def free_bytes(path=None) -> int:
    """Free bytes on the disk that holds `path` (default: the Hugging Face cache), measured at its
    nearest existing folder, as the cache may not exist before the first download."""
    path = Path(path) if path is not None else cache_dir()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_problem(repo: str, total: int, free: Optional[int] = None) -> Optional[str]:
    """A message when the disk cannot hold what is left to fetch of `repo` (`total` bytes, less what is
    in the cache already, plus a margin); None when it can."""
    free = free_bytes() if free is None else free
    need = max(total - cached_bytes(repo), 0) + DISK_MARGIN
    if need <= free:
        return None
    return f"Not enough disk space: {need / GB:.1f} GB needed, {free / GB:.1f} GB free in {cache_dir()}"


def known_download_size(repo: str) -> Optional[int]:
    """download_size, or None when the Hub cannot say (offline, gated, no such repo): the size serves a
    progress bar and the disk check, and the download itself then says what failed."""
    try:
        return download_size(repo)
    except Exception:  # noqa: BLE001 - whatever stops the Hub answering, the download will meet it and say it
        return None


def main(argv=None) -> int:
    repo = (sys.argv[1:] if argv is None else argv)[0]
    total = known_download_size(repo)
    if total is not None:
        print("total", total, flush=True)
        problem = disk_problem(repo, total)
        if problem:
            print("error disk", problem, flush=True)
            return DISK_FULL
    try:
        print("done", weights.download(repo, progress=False), flush=True)
    except weights.WeightsError as e:
        print("error", e.kind or "other", e, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
