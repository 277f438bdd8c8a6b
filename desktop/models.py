"""Which model to run: the choices, whether a model is on disk, how much memory it needs, and
downloading it from the Hugging Face Hub with progress.

The download runs `python -m mlx_crepulse.hub REPO` in a child process (QProcess), not in a thread:
it can then be stopped at once, and huggingface_hub resumes the partial files at the next start.
Progress is read from the size of the repo's folder in the Hugging Face cache against the total
the Hub announces for the files a pipeline needs.
"""

import subprocess
import sys
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QObject, QProcess, QTimer, Signal

from mlx_crepulse import hub, physical_memory

DEMO = "demo"
# (source, label); folders are added by the user
CHOICES = [(DEMO, "Demo (tiny, bundled)"), ("klein", "FLUX.2 [klein] 4B"), ("klein-base", "FLUX.2 [klein] 4B base"),
           ("klein-9b", "FLUX.2 [klein] 9B"), ("schnell", "FLUX.1-schnell"), ("dev", "FLUX.1-dev")]
LABELS = dict(CHOICES)
# Memory a pipeline needs to run (its weights, scripts/klein_memory.py for [klein], plus a batch's
# activations), in GB, by precision
FLUX_NEEDS_GB = {None: 33.0, 8: 18.0, 4: 10.0}
KLEIN_4B_NEEDS_GB = {None: 16.5, 8: 10.0, 4: 6.5}
KLEIN_9B_NEEDS_GB = {None: 32.5, 8: 19.0, 4: 12.0}
NEEDS_GB = {"schnell": FLUX_NEEDS_GB, "dev": FLUX_NEEDS_GB, "klein": KLEIN_4B_NEEDS_GB,
            "klein-base": KLEIN_4B_NEEDS_GB, "klein-9b": KLEIN_9B_NEEDS_GB, "klein-9b-base": KLEIN_9B_NEEDS_GB}
DEMO_NEEDS_GB = 0.5
PRECISIONS = [(None, "full (bf16)"), (8, "8-bit"), (4, "4-bit")]
# GB a download brings (the files of weights.HUB_PATTERNS), known before the Hub answers, so the disk is
# checked before anything starts. FLUX.1: the folder docs/full-size.md writes with the Hub's names and
# shapes (transformer 23.8, T5 9.5, CLIP 0.25, VAE 0.17). [klein]: the modules of scripts/klein_memory.py
# built lazily in bf16 (transformer 7.75 / 18.16, VAE 0.17), with Qwen3's 36 layers as the Hub ships
# them (8.05 for Qwen3-4B; 16.38 for Qwen3-8B, whose LM head is not tied to its embedding).
DOWNLOAD_GB = {"schnell": 33.7, "dev": 33.7, "klein": 16.0, "klein-base": 16.0, "klein-9b": 34.7,
               "klein-9b-base": 34.7}


def label(source: str) -> str:
    if source in LABELS:
        return LABELS[source]
    p = Path(source)
    return p.name or source


repo_of = hub.repo_id


def physical_ram_gb() -> Optional[float]:
    """Physical memory of this machine in GB, as the engine's own memory checks read it."""
    try:
        return physical_memory() / 1e9
    except (ValueError, OSError, AttributeError, subprocess.SubprocessError):
        return None


def needs_gb(source: str, quantize: Optional[int]) -> float:
    if source == DEMO:
        return DEMO_NEEDS_GB
    folder = Path(source).expanduser()
    if folder.is_dir():  # a local folder: its weights, with the big parts shrunk when quantized
        total, big = 0, 0
        for f in folder.rglob("*.safetensors"):
            size = f.stat().st_size
            total += size
            if f.parent.name in ("transformer", "text_encoder_2"):
                big += size
        bytes_ = total - big + big * ((quantize or 16) / 16)
        return round(bytes_ / 1e9 * 1.3 + (0.5 if bytes_ > 1e9 else 0.0), 2)
    table = NEEDS_GB.get(source, FLUX_NEEDS_GB)
    return table.get(quantize, table[None])


def memory_problem(source: str, quantize: Optional[int], ram_gb: Optional[float] = None) -> Optional[str]:
    """A message when this machine has too little memory for the model, else None."""
    ram = physical_ram_gb() if ram_gb is None else ram_gb
    if ram is None:
        return None
    need = needs_gb(source, quantize)
    if need <= ram * 0.9:
        return None
    precision = dict(PRECISIONS)[quantize]
    advice = ""
    table = NEEDS_GB.get(source, FLUX_NEEDS_GB)
    if quantize != 4 and table[4] <= ram * 0.9:
        advice = " Choose 4-bit" + (" or 8-bit" if quantize is None and table[8] <= ram * 0.9 else "") + "."
    elif quantize != 4 or need > ram:
        advice = " " + smaller_model(source, ram)
    return (f"{label(source)} at {precision} needs about {need:.0f} GB of memory; this machine has "
            f"{ram:.0f} GB.{advice}")


def download_gb(source: str) -> Optional[float]:
    """GB a download of this model brings; None for a repo the table does not know."""
    return DOWNLOAD_GB.get(source)


def disk_problem(source: str) -> Optional[str]:
    """A message when the disk cannot hold the download of a built-in model; None when it can or when
    its size is unknown (the download then checks once the Hub has said it)."""
    repo, gb = repo_of(source), download_gb(source)
    return hub.disk_problem(repo, int(gb * hub.GB)) if repo and gb else None


def download_message(kind: Optional[str], repo: str, message: str) -> str:
    """A download failure (WeightsError.kind and the CLI's message) in an app user's words: no
    environment variables, no terminal commands."""
    name = next((label(s) for s, _ in CHOICES if repo_of(s) == repo), repo)
    if kind == "gated":
        return (f"{name} needs you to accept its licence at https://huggingface.co/{repo} and log in "
                "(File > Log in to Hugging Face), then download it again.")
    if kind == "offline":
        return "No internet connection: the download resumes where it stopped when you try again."
    if kind == "missing":
        return (f"There is no model {repo} on the Hugging Face Hub, or it is private: check the name, or "
                "log in (File > Log in to Hugging Face) if it is yours.")
    if kind == "disk":
        return (f"Not enough disk space: the disk holding {hub.cache_dir()} is full. Free some space and "
                "try again; the download resumes where it stopped.")
    return f"The download of {name} failed: {message}"


def smaller_model(source: str, ram: float) -> str:
    """Advice for a model too big even at 4-bit: the biggest built-in model that fits, or the demo."""
    fits = [s for s, _ in CHOICES if s in NEEDS_GB and s != source and NEEDS_GB[s][4] <= ram * 0.9]
    if not fits:
        return "Try the demo model."
    return f"Try {label(max(fits, key=lambda s: NEEDS_GB[s][4]))} at 4-bit, or the demo model."


def availability(source: str) -> Optional[str]:
    """None when the model's files are on disk; else a short reason (a Hub model not downloaded yet,
    a folder that is not a pipeline)."""
    if source == DEMO:
        return None
    folder = Path(source).expanduser()
    if folder.exists():
        if not (folder / "model_index.json").exists():
            return f"{folder} is not a diffusers pipeline folder (no model_index.json)"
        return None
    repo = repo_of(source)
    if repo is None:
        return f"unknown model {source!r}: choose demo, schnell, dev, a Hub repo id or a folder"
    return None if hub.is_downloaded(repo) else f"{label(source)} is not downloaded yet"


class Downloader(QObject):
    """Download a Hub pipeline in a child process. Signals: progress(done bytes, total bytes or 0),
    finished(folder), failed(message in the app's words, kind: WeightsError's kinds, "stopped" or "other")."""
    progress = Signal(int, int)
    finished = Signal(str)
    failed = Signal(str, str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.process = None
        self.repo = None
        self.total = 0
        self._out = ""
        self._timer = QTimer(self)
        self._timer.setInterval(500)
        self._timer.timeout.connect(self._poll)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def start(self, repo: str):
        if self.running:
            return
        self.repo, self.total, self._out = repo, 0, ""
        p = QProcess(self)
        p.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        p.readyReadStandardOutput.connect(self._read)
        p.finished.connect(self._ended)
        p.errorOccurred.connect(self._error)
        self.process = p
        p.start(sys.executable, ["-m", "mlx_crepulse.hub", repo])
        self._timer.start()

    def stop(self):
        """Stop now; what was fetched stays in the cache and the next start resumes it."""
        if self.running:
            self.process.kill()
            self.process.waitForFinished(3000)

    def _read(self):
        self._out += bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        for line in self._out.splitlines():
            if line.startswith("total "):
                try:
                    self.total = int(line.split()[1])
                except ValueError:
                    pass

    def _poll(self):
        done = hub.cached_bytes(self.repo)
        self.progress.emit(min(done, self.total) if self.total else done, self.total)

    def _error(self, error):
        if error == QProcess.ProcessError.FailedToStart:
            self._timer.stop()
            self.failed.emit(f"could not start the download: {self.process.errorString()}", "other")

    def _ended(self, code, status):
        self._timer.stop()
        self._read()
        self._report(code, status == QProcess.ExitStatus.CrashExit)

    def _report(self, code: int, crashed: bool = False):
        """Say how the child's run ended, from what it printed (`done`, or `error KIND MESSAGE`)."""
        lines = self._out.splitlines()
        done = [l[5:] for l in lines if l.startswith("done ")]
        errors = [l[6:] for l in lines if l.startswith("error ")]
        if code == 0 and done:
            self.progress.emit(self.total, self.total)
            self.finished.emit(done[-1])
        elif crashed:
            self.failed.emit("download stopped; starting it again resumes where it left off", "stopped")
        elif errors:
            kind, _, message = errors[-1].partition(" ")
            # the child's disk check speaks plainly already; everything else is in the CLI's words
            self.failed.emit(message if code == hub.DISK_FULL else
                             download_message(None if kind == "other" else kind, self.repo, message), kind)
        else:
            self.failed.emit(download_message(None, self.repo, lines[-1] if lines else f"exit code {code}"), "other")
