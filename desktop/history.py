"""History that survives restarts and crashes: batches, images, stars and full recipes.

Layout under the app-data folder:
    history.sqlite3                     batches and images (Python's sqlite3, WAL journal)
    images/<stamp>-<id>/NN.png          each image, with the CLI's metadata (recipe chunks)
    images/<stamp>-<id>/inputs.npz      what the settings alone cannot rebuild: custom initial noise,
                                        reference signatures, the start image of an image-to-image run

Crash safety comes from ordering: a batch's files are written whole (each PNG under a hidden name,
then renamed), flushed to disk, and only then are its rows inserted, in one transaction. A crash
before the commit leaves at most an unreferenced folder (removed at a later start); no row ever
points at a missing file, and earlier batches are untouched.

A History may be used from several threads (the engine thread saves, the window reads): each
thread gets its own connection.
"""

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from mlx_crepulse import metadata, migrate_recipe as migrate
from mlx_crepulse.metadata import slug

ENV_DIR = "MLX_CREPULSE_APP_DIR"
DB_NAME = "history.sqlite3"
IMAGES = "images"
INPUTS = "inputs.npz"
USER_VERSION = 2  # of the database: 2 stores schema-2 recipes
ORPHAN_AGE_S = 600  # an unreferenced batch folder older than this is a crash's leftover

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent_image INTEGER,
    folder TEXT NOT NULL UNIQUE,
    recipe TEXT NOT NULL,
    has_inputs INTEGER NOT NULL DEFAULT 0,
    seconds REAL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    file TEXT NOT NULL,
    seed INTEGER,
    width INTEGER,
    height INTEGER,
    starred INTEGER NOT NULL DEFAULT 0,
    signature BLOB,
    label TEXT,
    UNIQUE (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS batches_prompt ON batches (prompt, model);
CREATE INDEX IF NOT EXISTS images_starred ON images (starred);
"""


def default_folder() -> Path:
    """$MLX_CREPULSE_APP_DIR, else the platform's app-data folder (QStandardPaths.AppDataLocation)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    from PySide6.QtCore import QStandardPaths
    data = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation))
    old = Path(QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation))
    if (old / DB_NAME).exists() and not (data / "mlx-crepulse" / DB_NAME).exists():
        return old  # the doubled .../mlx-crepulse/mlx-crepulse of 0.1: the user's history stays where it is
    return data / "mlx-crepulse"


@dataclass
class Image:
    id: int
    batch_id: int
    index: int
    path: Path
    seed: Optional[int]
    width: int
    height: int
    starred: bool
    label: str = ""
    prompt: str = ""


@dataclass
class Batch:
    id: int
    created: float
    prompt: str
    model: str
    kind: str
    parent_image: Optional[int]
    folder: Path
    recipe: dict
    has_inputs: bool
    seconds: float
    images: list = field(default_factory=list)

    @property
    def note(self) -> dict:
        """What the app added to the engine's settings: kind, diversity knob, parent, blend alphas..."""
        return self.recipe.get("app", {})


class History:
    def __init__(self, folder=None):
        self.folder = Path(folder) if folder is not None else default_folder()
        self.images_dir = self.folder / IMAGES
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / DB_NAME
        self._local = threading.local()
        db = self._db()
        db.executescript(SCHEMA)
        self._migrate(db)
        self.remove_orphans()

    def _migrate(self, db):
        """Bring the stored recipes to the current schema, all in one transaction (version 1: the
        recipes of mlx-crepulse 0.1, `Recipe.from_dict`'s schema 1)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= USER_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for row_id, text in db.execute("SELECT id, recipe FROM batches").fetchall():
                stored = json.loads(text)
                app = stored.pop("app", None)
                recipe = dict(migrate(stored), **({"app": app} if app is not None else {}))
                db.execute("UPDATE batches SET recipe = ? WHERE id = ?", (json.dumps(recipe, allow_nan=False), row_id))
            db.execute(f"PRAGMA user_version = {USER_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- connections ------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)  # explicit transactions
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            self._local.db = db
        return db

    def close(self):
        """Close the calling thread's connection (the next call opens a new one)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --- writing ------------------------------------------------------------------------------------------

    def add_batch(self, result, kind: str = "generate", note: Optional[dict] = None,
                  parent_image: Optional[int] = None, inputs: Optional[dict] = None,
                  labels: Optional[list] = None) -> int:
        """Store a `Result` (PIL images): PNG files and inputs first, flushed, then the rows in one
        transaction. Returns the new batch id. `inputs`: arrays needed to run the recipe again
        (latents, reference, image); `labels`: a caption per image (e.g. "A", "B", "a=0.50")."""
        settings = result.recipe.to_dict()
        recipe = dict(settings, app=dict(note or {}, kind=kind, parent_image=parent_image))
        name = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
        folder = self.images_dir / name
        folder.mkdir(parents=True)
        try:
            files = []
            for i, image in enumerate(result.images):
                png = dict(settings, index=i, image_seed=result.seeds[i],
                           app=dict(kind=kind, custom_noise=bool(inputs and "latents" in inputs)))
                path = metadata.write_png(folder / f"{i:02d}.png", image, png)
                _fsync(path)
                files.append(path)
            inputs = {k: np.asarray(v) for k, v in (inputs or {}).items() if v is not None}
            if inputs:
                tmp = folder / f".{INPUTS}.tmp"
                with open(tmp, "wb") as f:
                    np.savez(f, **inputs)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, folder / INPUTS)
            _fsync_dir(folder)
            _fsync_dir(self.images_dir)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        sigs = result.signatures
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "INSERT INTO batches (created, prompt, model, kind, parent_image, folder, recipe, has_inputs, seconds)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), settings["prompt"], str(settings.get("model", "")), kind, parent_image, name,
                 json.dumps(recipe, allow_nan=False, default=_json_default), int(bool(inputs)),
                 float(getattr(result, "seconds", 0.0))))
            batch_id = cur.lastrowid
            for i, path in enumerate(files):
                sig = None if sigs is None else np.asarray(sigs[i], np.float16).tobytes()
                w, h = result.images[i].size
                db.execute("INSERT INTO images (batch_id, idx, file, seed, width, height, starred, signature, label)"
                           " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                           (batch_id, i, f"{name}/{path.name}", int(result.seeds[i]), w, h, sig,
                            labels[i] if labels else ""))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return batch_id

    def set_starred(self, image_id: int, starred: bool):
        self._db().execute("UPDATE images SET starred = ? WHERE id = ?", (int(bool(starred)), image_id))

    def delete_batch(self, batch_id: int):
        """Rows first (in one transaction), then the files: a crash in between leaves an orphan folder."""
        b = self.batch(batch_id)
        if b is None:
            return
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM images WHERE batch_id = ?", (batch_id,))
        db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        db.execute("COMMIT")
        shutil.rmtree(b.folder, ignore_errors=True)

    def remove_orphans(self, older_than: float = ORPHAN_AGE_S) -> list:
        """Delete batch folders no row refers to (a crash between writing files and the commit)."""
        known = {r[0] for r in self._db().execute("SELECT folder FROM batches")}
        removed = []
        now = time.time()
        for d in self.images_dir.iterdir():
            if d.is_dir() and d.name not in known and now - d.stat().st_mtime > older_than:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    # --- reading ------------------------------------------------------------------------------------------

    def _image(self, r, prompt="") -> Image:
        return Image(r["id"], r["batch_id"], r["idx"], self.images_dir / r["file"], r["seed"], r["width"],
                     r["height"], bool(r["starred"]), r["label"] or "", prompt)

    def _batch(self, r, with_images=True, starred_only=False) -> Batch:
        b = Batch(r["id"], r["created"], r["prompt"], r["model"], r["kind"], r["parent_image"],
                  self.images_dir / r["folder"], json.loads(r["recipe"]), bool(r["has_inputs"]), r["seconds"] or 0.0)
        if with_images:
            q = "SELECT * FROM images WHERE batch_id = ?" + (" AND starred" if starred_only else "") + " ORDER BY idx"
            b.images = [self._image(i, b.prompt) for i in self._db().execute(q, (b.id,))]
        return b

    def batch(self, batch_id: int, starred_only: bool = False) -> Optional[Batch]:
        r = self._db().execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return self._batch(r, starred_only=starred_only) if r else None

    def batches(self, text: str = "", starred_only: bool = False, limit: int = 500) -> list:
        """Newest first; `text` filters prompts (case-insensitive substring); `starred_only` keeps
        batches with a starred image, and only those images."""
        q = "SELECT * FROM batches b WHERE 1"
        args = []
        if text:
            q += " AND instr(lower(b.prompt), lower(?)) > 0"
            args.append(text)
        if starred_only:
            q += " AND EXISTS (SELECT 1 FROM images i WHERE i.batch_id = b.id AND i.starred)"
        q += " ORDER BY b.id DESC LIMIT ?"
        args.append(limit)
        return [self._batch(r, starred_only=starred_only) for r in self._db().execute(q, args)]

    def recent_prompts(self, limit: int = 15) -> list:
        """Distinct prompts, the most recently used first."""
        rows = self._db().execute("SELECT prompt FROM batches GROUP BY prompt ORDER BY MAX(id) DESC LIMIT ?", (limit,))
        return [r["prompt"] for r in rows]

    def image(self, image_id: int) -> Optional[Image]:
        r = self._db().execute("SELECT i.*, b.prompt FROM images i JOIN batches b ON b.id = i.batch_id "
                               "WHERE i.id = ?", (image_id,)).fetchone()
        return self._image(r, r["prompt"]) if r else None

    def starred(self) -> list:
        rows = self._db().execute("SELECT i.*, b.prompt FROM images i JOIN batches b ON b.id = i.batch_id "
                                  "WHERE i.starred ORDER BY i.batch_id DESC, i.idx")
        return [self._image(r, r["prompt"]) for r in rows]

    def signatures(self, prompt: str, model: str) -> Optional[np.ndarray]:
        """The contextual signatures of every image seen for this prompt with this model, (R, D) float16."""
        rows = self._db().execute("SELECT i.signature FROM images i JOIN batches b ON b.id = i.batch_id "
                                  "WHERE b.prompt = ? AND b.model = ? AND i.signature IS NOT NULL ORDER BY i.id",
                                  (prompt, model)).fetchall()
        if not rows:
            return None
        sigs = [np.frombuffer(r[0], np.float16) for r in rows]
        dim = len(sigs[-1])
        sigs = [s for s in sigs if len(s) == dim]
        return np.stack(sigs)

    def inputs(self, batch_id: int) -> dict:
        """The stored arrays of a batch (latents, reference, image), empty when it has none."""
        b = self.batch(batch_id)
        if b is None or not b.has_inputs:
            return {}
        with np.load(b.folder / INPUTS) as z:
            return {k: z[k] for k in z.files}

    def count(self) -> int:
        return self._db().execute("SELECT count(*) FROM batches").fetchone()[0]

    # --- export and checks --------------------------------------------------------------------------------

    def export(self, image_ids, folder) -> list:
        """Copy images (PNG files with their recipes) to `folder`, named after prompt, batch and index;
        never overwrites."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for image_id in image_ids:
            im = self.image(image_id)
            if im is None or not im.path.exists():
                continue
            target = folder / f"{slug(im.prompt, 40)}-b{im.batch_id}-{im.index:02d}.png"
            k = 1
            while target.exists():
                target = target.with_name(f"{slug(im.prompt, 40)}-b{im.batch_id}-{im.index:02d}-{k}.png")
                k += 1
            shutil.copy2(im.path, target)
            out.append(target)
        return out

    def check(self) -> list:
        """Problems found: SQLite's integrity check, foreign keys, rows pointing at missing files.
        Empty when all is well."""
        db = self._db()
        problems = [r[0] for r in db.execute("PRAGMA integrity_check") if r[0] != "ok"]
        problems += [f"foreign key: {tuple(r)}" for r in db.execute("PRAGMA foreign_key_check")]
        for r in db.execute("SELECT file FROM images"):
            if not (self.images_dir / r[0]).is_file():
                problems.append(f"missing file {r[0]}")
        for r in db.execute("SELECT folder FROM batches WHERE has_inputs"):
            if not (self.images_dir / r[0] / INPUTS).is_file():
                problems.append(f"missing inputs {r[0]}/{INPUTS}")
        return problems


def _fsync(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


