"""The feedback store: captions served, the photos they were made from, and users' ratings and
corrections, in one SQLite file (WAL mode: many readers and concurrent writers)."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from captioner.errors import CaptionerError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY,          -- of the uploaded bytes: one row per distinct photo
    bytes BLOB NOT NULL,              -- the photo as uploaded, so finetune can use it
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    id TEXT PRIMARY KEY,              -- the caption_id given to the client
    created REAL NOT NULL,            -- unix time
    source TEXT NOT NULL,             -- "api" or "app"
    client TEXT NOT NULL,             -- SHA-256 prefix of the client id (never a raw key)
    experiment TEXT NOT NULL,
    variant TEXT NOT NULL,
    assigned INTEGER NOT NULL,        -- 1: the experiment chose the variant; 0: the client did
    model TEXT NOT NULL,              -- model name
    model_version TEXT NOT NULL,      -- checkpoint hash
    image_sha256 TEXT REFERENCES images(sha256),
    caption TEXT NOT NULL,
    score REAL NOT NULL,
    options TEXT NOT NULL             -- search options as JSON
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    caption_id TEXT NOT NULL REFERENCES captions(id),
    created REAL NOT NULL,
    rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 5),
    correction TEXT
);
CREATE INDEX IF NOT EXISTS captions_variant ON captions(experiment, variant);
CREATE INDEX IF NOT EXISTS feedback_caption ON feedback(caption_id);
"""


class FeedbackError(CaptionerError):
    """Feedback that cannot be stored: unknown caption id, rating out of range, nothing given."""


@dataclass
class Served:
    """One caption as served, to be recorded."""

    source: str  # "api" or "app"
    client: str  # raw client id: hashed before it is stored
    experiment: str
    variant: str
    assigned: bool  # chosen by the experiment (counts in the A/B report) rather than by the client
    model: str
    model_version: str
    caption: str
    score: float
    options: dict
    image: bytes | None = None  # the photo's bytes as uploaded


@dataclass
class Correction:
    """A photo and the caption a user says it should have had."""

    caption_id: str
    image: bytes
    caption: str


def client_hash(client: str) -> str:
    return hashlib.sha256(client.encode()).hexdigest()[:16]


class FeedbackStore:
    """SQLite store; one connection per thread, so the server's threads can all write."""

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        # every live thread's connection, for close(); a server's worker threads come and go
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conn().executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread=False only so that close() can close it: each thread uses its own
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
            db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the file consistent; fsync at checkpoints
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                # close the connections of threads that have ended (idle pool threads exit), so a
                # long-running server does not pile up connections, caches and file handles
                for thread, old in [x for x in self._all if not x[0].is_alive()]:
                    old.close()
                self._all = [x for x in self._all if x[0].is_alive()] + [(threading.current_thread(), db)]
        return db

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        """Run statements in one transaction (BEGIN IMMEDIATE: writers queue, never deadlock)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, args in statements:
                db.execute(sql, args)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def record_caption(self, s: Served) -> str:
        """Store a served caption (and its photo, once per distinct photo); returns its id."""
        caption_id = uuid.uuid4().hex
        now = time.time()
        sha = hashlib.sha256(s.image).hexdigest() if s.image is not None else None
        statements = []
        if s.image is not None:
            statements.append(("INSERT OR IGNORE INTO images (sha256, bytes, created) VALUES (?, ?, ?)",
                               (sha, s.image, now)))
        statements.append((
            "INSERT INTO captions (id, created, source, client, experiment, variant, assigned, model, "
            "model_version, image_sha256, caption, score, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (caption_id, now, s.source, client_hash(s.client), s.experiment, s.variant, int(s.assigned),
             s.model, s.model_version, sha, s.caption, float(s.score), json.dumps(s.options, sort_keys=True))))
        self._write(statements)
        return caption_id

    def add_feedback(self, caption_id: str, rating: int | None = None, correction: str | None = None) -> int:
        """Store a rating (1-5) and/or a corrected caption for a served caption; returns its row id."""
        if rating is None and not (correction and correction.strip()):
            raise FeedbackError("feedback needs a rating (1-5) or a corrected caption")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            raise FeedbackError(f"rating must be an integer from 1 to 5, not {rating!r}")
        correction = correction.strip() if correction and correction.strip() else None
        db = self._conn()
        if db.execute("SELECT 1 FROM captions WHERE id = ?", (caption_id,)).fetchone() is None:
            raise FeedbackError(f"no caption with id {caption_id!r}")
        db.execute("BEGIN IMMEDIATE")
        try:
            cur = db.execute("INSERT INTO feedback (caption_id, created, rating, correction) VALUES (?, ?, ?, ?)",
                             (caption_id, time.time(), rating, correction))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return int(cur.lastrowid)

    def caption(self, caption_id: str) -> dict | None:
        row = self._conn().execute(
            "SELECT id, source, experiment, variant, assigned, model, model_version, image_sha256, caption, score, "
            "options FROM captions WHERE id = ?", (caption_id,)).fetchone()
        if row is None:
            return None
        keys = ("id", "source", "experiment", "variant", "assigned", "model", "model_version", "image_sha256",
                "caption", "score", "options")
        out = dict(zip(keys, row))
        out["options"] = json.loads(out["options"])
        return out

    def experiments(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT DISTINCT experiment FROM captions ORDER BY experiment")]

    def traffic(self, experiment: str) -> dict[str, int]:
        """Captions served per variant, counting only clients the experiment assigned."""
        rows = self._conn().execute("SELECT variant, COUNT(*) FROM captions WHERE experiment = ? AND assigned = 1 "
                                    "GROUP BY variant", (experiment,))
        return {v: n for v, n in rows}

    def ratings(self, experiment: str) -> dict[str, list[int]]:
        """Ratings per variant (assigned traffic only); a caption rated twice counts its last rating."""
        rows = self._conn().execute(
            "SELECT c.variant, f.rating FROM feedback f JOIN captions c ON c.id = f.caption_id "
            "WHERE c.experiment = ? AND c.assigned = 1 AND f.rating IS NOT NULL AND f.id = "
            "(SELECT MAX(g.id) FROM feedback g WHERE g.caption_id = f.caption_id AND g.rating IS NOT NULL)",
            (experiment,))
        out: dict[str, list[int]] = {}
        for variant, rating in rows:
            out.setdefault(variant, []).append(int(rating))
        return out

    def corrections(self) -> list[Correction]:
        """Every corrected caption with its photo (the latest correction per caption)."""
        rows = self._conn().execute(
            "SELECT f.caption_id, i.bytes, f.correction FROM feedback f JOIN captions c ON c.id = f.caption_id "
            "JOIN images i ON i.sha256 = c.image_sha256 WHERE f.correction IS NOT NULL AND f.id = "
            "(SELECT MAX(g.id) FROM feedback g WHERE g.caption_id = f.caption_id AND g.correction IS NOT NULL) "
            "ORDER BY f.id")
        return [Correction(cid, bytes(img), text) for cid, img, text in rows]

    def close(self) -> None:
        """Close every thread's connection (the store reopens on next use)."""
        with self._lock:
            for _, db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()
