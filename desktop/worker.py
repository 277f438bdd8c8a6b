"""The engine thread: one QThread per process owns the model and does all of MLX's work.

The window never touches MLX. It submits a `Job` (a `Recipe` and the inputs a recipe cannot hold:
noise to start from, a reference set, a blend's sources); the engine thread loads the model if
needed, resolves the recipe for it (`Pipeline.resolve`: the model's defaults, the diversity knob), makes
the noise, runs `Pipeline.generate` with a callback, saves the batch to the history (files first, then
rows) and reports back through Qt signals (queued into the GUI thread):

    status(str)                 loading a model, saving...
    warning(str)                something the user should know, the job goes on (a prompt cut short)
    loaded(str, dict)           a model is ready: its source and defaults
    progress(int, int, float, float)   step, steps, elapsed s, estimated s left
    preview(object, int, int)   list of QImage (the current prediction of each image: decoded, or by the
                                quick latent-to-RGB map at the latent image's size), step, steps
    finished(int)               the new batch's id in the history
    cancelled()                 stopped at the user's request; nothing was saved
    failed(str, str)            a message for the user, and a kind: "weights", "value", "memory", "error"

Cancelling sets a flag the step callback reads, so a run stops within one step.

MLX binds GPU streams to the thread that created them, which is why a single long-lived thread (not
one per window) loads and runs every pipeline; windows come and go and connect to it.
"""

import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np
from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtGui import QImage

from mlx_crepulse import Blend, Cancelled, Pipeline, Recipe, Repulsion, WeightsError, hub, mix_noise

from . import models

# a full preview costing more than this share of a step, and more than a wait a person notices
# (QUICK_FLOOR_S, well above the demo's decodes even on a busy machine: its VAE is too far from linear
# for the quick map), is replaced by the quick one
QUICK_WHEN = 0.1
QUICK_FLOOR_S = 0.25


@dataclass
class Mix:
    """Initial noise near `base`: mix_noise(base, noise of `seed`, strength)."""
    base: object  # a noise spec: an ndarray (tokens, channels) or an int seed
    seed: int
    strength: float


@dataclass
class Job:
    """One batch to make: its Recipe, and what a recipe cannot hold. Noise specs (`noise`, one per image)
    are arrays, int seeds or `Mix`; None means the recipe's seeds. `reference`: signatures of images seen
    already, to push away from. `sources`: a blend's A and B, as (the job of the batch each was made in,
    its index)."""
    recipe: Recipe
    low_memory: bool = False
    kind: str = "generate"
    reference: Optional[np.ndarray] = None
    sources: Optional[list] = None
    noise: Optional[list] = None
    image: Optional[np.ndarray] = None  # uint8 (n, H, W, 3): image to image
    parent_image: Optional[int] = None
    labels: Optional[list] = None
    note: dict = field(default_factory=dict)
    loras: list = field(default_factory=list)  # (file or Hub reference, scale), or a recipe's recorded LoRAs

    @property
    def source(self) -> str:
        return self.recipe.model

    @property
    def quantize(self) -> Optional[int]:
        return self.recipe.quantize

    @property
    def prompt(self) -> str:
        return self.recipe.prompt

    @property
    def n(self) -> int:
        return self.recipe.n

    @property
    def model_key(self):
        return (self.source, self.quantize, self.low_memory)


def to_qimages(pixels: np.ndarray) -> list:
    """Float images (n, H, W, 3) in [0, 1] -> QImages (safe to make outside the GUI thread)."""
    out = []
    for p in np.asarray(pixels):
        a = np.ascontiguousarray((np.clip(p, 0, 1) * 255).round().astype(np.uint8))
        h, w = a.shape[:2]
        out.append(QImage(a.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy())
    return out


class _Runner(QObject):
    status = Signal(str)
    warning = Signal(str)
    loaded = Signal(str, dict)
    progress = Signal(int, int, float, float)
    preview = Signal(object, int, int)
    finished = Signal(int)
    cancelled = Signal()
    failed = Signal(str, str)

    def __init__(self):
        super().__init__()
        self.cancel_flag = threading.Event()
        self.pipe = None
        self.key = None
        self.previews = True

    @Slot(object, object)
    def run(self, job: Job, history):
        try:
            self._run(job, history)
        except Cancelled:
            self.cancelled.emit()
        except WeightsError as e:  # a download failure (a model gone from the cache) in the app's words
            self.failed.emit(models.download_message(e.kind, models.repo_of(job.source) or job.source, str(e))
                             if e.kind else str(e), "weights")
        except MemoryError as e:
            self.failed.emit(f"out of memory: {e or 'the model does not fit'}; try 4-bit or a smaller size", "memory")
        except ValueError as e:
            self.failed.emit(str(e), "value")
        except Exception as e:  # noqa: BLE001 - the thread must survive anything and say what went wrong
            kind = "memory" if any(w in str(e).lower() for w in ("memory", "malloc", "allocate")) else "error"
            self.failed.emit(f"{type(e).__name__}: {e}", kind)

    def load(self, job: Job) -> Pipeline:
        same = self.pipe is not None and self.key[0] == job.source and self.key[2] == job.low_memory and \
            job.quantize in (self.key[1], self.pipe.quantize)  # a folder saved quantized reports its bits
        if not same:
            self.pipe = self.key = None  # free the old model before loading the new one
            import gc
            gc.collect()
            repo = models.repo_of(job.source)
            if repo and not hub.is_downloaded(repo):  # gone since the window checked: online, loading would
                # fetch gigabytes here, with no progress shown and no way to stop it
                raise WeightsError(f"{models.label(job.source)} is no longer in the download folder: download it "
                                   "again with the Download button.")
            self.status.emit(f"loading {job.source}" + (f" ({job.quantize}-bit)" if job.quantize else "") + " ...")
            self.pipe = Pipeline.from_pretrained(job.source, quantize=job.quantize, low_memory=job.low_memory)
            self.key = job.model_key
            self.loaded.emit(job.source, asdict(self.pipe.defaults))
        return self.pipe

    def _run(self, job: Job, history):
        pipe = self.load(job)
        if self.cancel_flag.is_set():
            raise Cancelled()
        recipe = self._recipe(pipe, job)
        unknown = pipe.files.unknown_words(recipe.prompt)
        if unknown:
            self.warning.emit(f"This model knows only the words {', '.join(pipe.files.vocabulary)}: "
                              f"{', '.join(unknown)} will not change the picture.")
        for what, count, limit in pipe.files.token_overflow(recipe):
            self.warning.emit(f"The {what} is {count} tokens long and this model reads {limit}: the end of it is "
                              "ignored.")
        self.status.emit("generating ...")
        last = {"t": 0.0, "cost": 0.0, "decode": None}

        def callback(p):
            if self.cancel_flag.is_set():
                return False
            self.progress.emit(p.step, p.steps, p.elapsed, p.eta)
            # A full preview costs a VAE decode per image. Once this run has measured one and it weighs
            # on the steps (QUICK_WHEN), the fitted latent-to-RGB map stands in (a matmul); either way a
            # preview is shown only while it stays cheap next to the steps.
            now = time.perf_counter()
            if self.previews and p.step < p.steps and now - last["t"] >= 2 * last["cost"]:
                step = p.elapsed / p.step
                quick = last["decode"] is not None and last["decode"] > max(QUICK_FLOOR_S, QUICK_WHEN * step)
                t0 = time.perf_counter()
                images = p.preview(quick=quick)
                last["cost"] = time.perf_counter() - t0
                if not quick:
                    last["decode"] = last["cost"]
                self.preview.emit(to_qimages(images), p.step, p.steps)
                last["t"] = time.perf_counter()
            return not self.cancel_flag.is_set()

        latents, image = self._inputs(pipe, job, recipe)
        result = pipe.generate(recipe, callback=callback, latents=latents, image=image)
        self.status.emit("saving ...")
        inputs = {}
        if latents is not None:
            inputs["latents"] = result.noise
        if job.reference is not None:
            inputs["reference"] = np.asarray(job.reference, np.float16)
        if job.image is not None:
            inputs["image"] = np.asarray(job.image, np.uint8)
        note = dict(job.note, diversity=job.recipe.diversity)
        try:
            batch_id = history.add_batch(result, kind=job.kind, note=note, parent_image=job.parent_image,
                                         inputs=inputs, labels=job.labels)
        finally:
            history.close()  # this thread's connection; windows come and go, the thread stays
        self.finished.emit(batch_id)

    def _recipe(self, pipe, job: Job) -> Recipe:
        """The job's recipe resolved for the model (with the job's LoRAs applied), with its reference set
        and its blend's recordings."""
        wanted = [(l["source"], l["scale"]) if isinstance(l, dict) else tuple(l) for l in job.loras]
        if wanted != [(l["source"], l["scale"]) for l in pipe.loras]:
            self.status.emit("applying LoRAs ..." if wanted else "removing LoRAs ...")
            pipe.set_loras(job.loras)
        recipe = pipe.resolve(job.recipe)
        if job.reference is not None:  # push away from images seen already, at the job's diversity
            method = recipe.method if isinstance(recipe.method, Repulsion) else pipe.defaults.repulsion(0.0)
            recipe = replace(recipe, method=replace(method, reference=job.reference))
        if recipe.blend is not None:
            self.status.emit("recording the favourites in their batches ...")
            recipe = replace(recipe, blend=self._blend(pipe, job, recipe.blend))
        return recipe

    def _inputs(self, pipe, job: Job, recipe: Recipe):
        """The job's initial noise (None: the recipe's seeds) and start image as generate takes them."""
        latents = None
        if job.noise is not None:
            latents = np.stack([self._noise(pipe, spec, recipe.width, recipe.height) for spec in job.noise])
            latents = latents.astype(np.float32)
        image = None if job.image is None else np.asarray(job.image, np.float32) / 255.0
        return latents, image

    def _blend(self, pipe, job: Job, blend: Blend) -> Blend:
        """The job's Blend, with A and B recorded from the batches they were made in (so that they come out
        as they were, repulsion and all); a source that is itself a blend is replayed from its own sources."""
        recordings = {}
        for src in {id(s): s for s, _ in job.sources}.values():  # one recording run per source batch
            rows = sorted({i for s, i in job.sources if s is src})
            recipe = self._recipe(pipe, src)
            latents, image = self._inputs(pipe, src, recipe)
            made = pipe.record(recipe, rows, record_steps=blend.blended_steps, latents=latents, image=image,
                               callback=lambda p: not self.cancel_flag.is_set())
            recordings.update({(id(src), i): rec for i, rec in zip(rows, made)})
        return replace(blend, sources=tuple(recordings[(id(s), i)] for s, i in job.sources))

    @staticmethod
    def _noise(pipe, spec, width, height) -> np.ndarray:
        if isinstance(spec, Mix):
            base = _Runner._noise(pipe, spec.base, width, height)
            return mix_noise(base, pipe.noise([spec.seed], width, height)[0], spec.strength)
        if isinstance(spec, (int, np.integer)):
            return pipe.noise([int(spec)], width, height)[0]
        return np.asarray(spec, np.float32)


class Engine(QObject):
    """The GUI-thread handle on the engine thread. Get the process's one engine with `engine()`."""
    _submit = Signal(object, object)

    def __init__(self):
        super().__init__()
        self.thread = QThread()
        self.thread.setObjectName("crepulse-engine")
        self.runner = _Runner()
        self.runner.moveToThread(self.thread)
        self._submit.connect(self.runner.run)
        for s in (self.runner.finished, self.runner.cancelled, self.runner.failed):
            s.connect(self._done)  # queued into the GUI thread, before the windows' own slots
        r = self.runner  # its signals, for windows to connect to
        self.status, self.loaded, self.progress, self.preview = r.status, r.loaded, r.progress, r.preview
        self.warning = r.warning
        self.finished, self.cancelled, self.failed = r.finished, r.cancelled, r.failed
        self.busy = False
        self.thread.start()

    def submit(self, job: Job, history) -> bool:
        """Queue a job; False (and nothing queued) while another one runs."""
        if self.busy:
            return False
        self.busy = True
        self.runner.cancel_flag.clear()
        self._submit.emit(job, history)
        return True

    def cancel(self):
        """Ask the running job to stop after its current step (thread-safe: only sets a flag)."""
        if self.busy:
            self.runner.cancel_flag.set()

    def _done(self, *args):
        self.busy = False

    @property
    def previews(self) -> bool:
        """Whether the running and later batches show previews (read by the engine thread each step)."""
        return self.runner.previews

    @previews.setter
    def previews(self, on: bool):
        self.runner.previews = bool(on)

    @property
    def loaded_source(self):
        return self.runner.key[0] if self.runner.key else None

    def stop(self, timeout_ms: int = 30000):
        self.runner.cancel_flag.set()
        self.thread.quit()
        self.thread.wait(timeout_ms)


_engine: Optional[Engine] = None


def engine() -> Engine:
    global _engine
    if _engine is None:
        _engine = Engine()
        import atexit
        atexit.register(shutdown)
    return _engine


def shutdown():
    """Stop the engine thread (at exit, or at the end of a test session)."""
    global _engine
    if _engine is not None:
        _engine.stop()
        _engine = None
