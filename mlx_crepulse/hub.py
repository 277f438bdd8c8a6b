"""The Hugging Face Hub as the app and the CLI see it: which repo a model name means, whether a whole
pipeline is in the cache, how big a download is and how much of it has arrived.

`python -m mlx_crepulse.hub REPO` downloads REPO, printing `total BYTES` first and `done FOLDER` (or
`error MESSAGE`, exit 2) at the end: the app runs it as a child process, which can be stopped at once
and resumes where it stopped.
"""

import fnmatch
import sys
from pathlib import Path
from typing import Optional

from . import weights


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


def main(argv=None) -> int:
    repo = (sys.argv[1:] if argv is None else argv)[0]
    try:
        print("total", download_size(repo), flush=True)
    except Exception:  # noqa: BLE001 - the size is for the progress bar only; the download says what failed
        pass
    try:
        print("done", weights.download(repo, progress=False), flush=True)
    except weights.WeightsError as e:
        print("error", e, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
