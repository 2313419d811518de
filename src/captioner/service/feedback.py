"""The feedback store: captions served, the photos they were made from, users' ratings and
corrections, and the A/B experiment's live state (sticky assignments, promoted and retired
variants).

One store, two backends behind it: a SQLite file (the embedded default, WAL mode: many readers
and concurrent writers on one machine) or a PostgreSQL database (`postgresql://...`, psycopg 3)
that several server replicas share. Both get the same schema from one ordered list of
migrations, each applied once and recorded in `schema_version`."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from captioner.data.vocab import tokenize
from captioner.errors import CaptionerError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
MAX_CORRECTION_CHARS = 500  # a corrected caption, as the API and the app take it
STORE_FORMS = "a SQLite file path (e.g. captioner.db) or a postgresql:// (or postgres://) URL"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# C0 control characters other than tab, newline and carriage return, and lone surrogates (not
# encodable as UTF-8): PostgreSQL refuses NUL in text, and none of them belongs in a caption
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")

# The schema, as an ordered list of (description, statements). Never edit a migration that has
# shipped: append a new one. {pk}, {blob} and {real} are each backend's column types.
MIGRATIONS: list[tuple[str, list[str]]] = [
    ("captions, photos and feedback", [
        """CREATE TABLE IF NOT EXISTS images (
            sha256 TEXT PRIMARY KEY,          -- of the uploaded bytes: one row per distinct photo
            bytes {blob} NOT NULL,            -- the photo as uploaded, so finetune can use it
            created {real} NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS captions (
            id TEXT PRIMARY KEY,              -- the caption_id given to the client
            created {real} NOT NULL,          -- unix time
            source TEXT NOT NULL,             -- "api" or "app"
            client TEXT NOT NULL,             -- SHA-256 prefix of the client id (never a raw key)
            experiment TEXT NOT NULL,
            variant TEXT NOT NULL,
            assigned INTEGER NOT NULL,        -- 1: the experiment chose the variant; 0: the client did
            model TEXT NOT NULL,              -- model name
            model_version TEXT NOT NULL,      -- checkpoint hash
            image_sha256 TEXT REFERENCES images(sha256),
            caption TEXT NOT NULL,
            score {real} NOT NULL,
            options TEXT NOT NULL             -- search options as JSON
        )""",
        """CREATE TABLE IF NOT EXISTS feedback (
            id {pk},
            caption_id TEXT NOT NULL REFERENCES captions(id),
            created {real} NOT NULL,
            rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 5),
            correction TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS captions_variant ON captions(experiment, variant)",
        "CREATE INDEX IF NOT EXISTS feedback_caption ON feedback(caption_id)",
    ]),
    ("A/B: sticky assignments, promoted and retired variants, their history", [
        """CREATE TABLE IF NOT EXISTS ab_assignments (
            experiment TEXT NOT NULL,
            client TEXT NOT NULL,             -- SHA-256 prefix of the client id, as in captions
            variant TEXT NOT NULL,
            created {real} NOT NULL,
            PRIMARY KEY (experiment, client)
        )""",
        """CREATE TABLE IF NOT EXISTS ab_variants (
            experiment TEXT NOT NULL,         -- a variant without a row here is live
            variant TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('live', 'promoted', 'retired')),
            updated {real} NOT NULL,
            PRIMARY KEY (experiment, variant)
        )""",
        """CREATE TABLE IF NOT EXISTS ab_events (
            id {pk},
            experiment TEXT NOT NULL,
            variant TEXT NOT NULL,
            action TEXT NOT NULL,             -- "promote" or "retire"
            created {real} NOT NULL
        )""",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)


class FeedbackError(CaptionerError):
    """Feedback that cannot be stored: unknown caption id, rating out of range, nothing given."""


class StoreError(CaptionerError):
    """The store cannot be opened or used: file not found, driver missing, a newer schema."""


class StoreUnavailable(StoreError):
    """The store is busy (locked past the timeout) or unreachable right now: nothing was stored;
    retry later. The server answers 503 with Retry-After."""


class ExperimentStateError(CaptionerError):
    """A promotion or retirement that cannot be done: unknown variant, or none would stay live."""


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


@dataclass
class ExperimentState:
    """What the store says about an experiment's variants: promoted or retired (the others are live)."""

    experiment: str
    status: dict[str, str] = field(default_factory=dict)  # variant -> "promoted" | "retired"

    @property
    def promoted(self) -> str | None:
        return next((v for v, s in sorted(self.status.items()) if s == "promoted"), None)

    @property
    def retired(self) -> set[str]:
        return {v for v, s in self.status.items() if s == "retired"}

    def of(self, variant: str) -> str:
        return self.status.get(variant, "live")


def text_problem(text: str) -> str | None:
    """What makes `text` unstorable on either backend (a control character, a lone surrogate),
    or None: checked before the store is touched, so both backends refuse the same text."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    char = found.group()
    what = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return f"holds {what} (U+{ord(char):04X}) at position {found.start()}: send text (tabs and newlines are fine)"


def client_hash(client: str) -> str:
    return hashlib.sha256(client.encode()).hexdigest()[:16]


def is_postgres_url(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(POSTGRES_SCHEMES)


def is_url(db: str | Path) -> bool:
    """Whether `db` looks like a URL (scheme://...), supported or not: never a file path."""
    return isinstance(db, str) and _URL.match(db) is not None


def redact(db: str | Path) -> str:
    """The store's name for messages and logs: a URL's password replaced by ***."""
    text = str(db)
    if not is_url(text):
        return text
    scheme, rest = text.split("://", 1)
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
    userinfo, at, host = rest[:cut].rpartition("@")
    if not at or ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}{rest[cut:]}"


# --- the two backends: connections, transactions, dialect -------------------------------------

class _Tx:
    """A transaction's handle: execute(sql, args) with ? placeholders on either backend."""

    def __init__(self, conn: Any, postgres: bool):
        self.conn, self.postgres = conn, postgres

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        if self.postgres:
            sql = sql.replace("%", "%%").replace("?", "%s")
        return self.conn.execute(sql, tuple(args))


class _SQLite:
    """A SQLite file; one connection per thread, so the server's threads can all write."""

    types = {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "real": "REAL"}

    def __init__(self, path: Path, busy_timeout_s: float):
        self.path, self.busy_timeout_s = path, busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        # every live thread's connection, for close(); a server's worker threads come and go
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []

    def conn(self) -> sqlite3.Connection:
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

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        """BEGIN IMMEDIATE for writers (they queue on the lock, never deadlock), BEGIN for readers."""
        try:
            db = self.conn()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"the feedback store {self.path} is busy ({e}); retry shortly") from None
        except sqlite3.DatabaseError as e:  # SQLite's header, but a damaged file
            raise StoreError(f"{self.path}: not a usable SQLite database ({e})") from None
        try:
            yield _Tx(db, False)
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"the feedback store {self.path} is busy ({e}); retry shortly") from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def has_table(self, tx: _Tx, name: str) -> bool:
        return tx.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def exclusive(self, tx: _Tx) -> None:
        """Serialise this write transaction with every other that asks (migrations, experiment
        state): BEGIN IMMEDIATE already holds SQLite's one write lock."""

    def close(self) -> None:
        with self._lock:
            for _, db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()


def _one_line(e: Exception, url: str = "") -> str:
    """A driver's message on one line (libpq's span several, indented), `url` in it redacted:
    libpq quotes a URL it cannot parse, password and all."""
    text = " ".join(str(e).split()) or type(e).__name__
    if url:
        text = text.replace(url, redact(url))
        password = redact_password(url)
        if password and len(password) >= 4:
            text = text.replace(password, "***")
    return text


def redact_password(url: str) -> str | None:
    userinfo = url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].rpartition("@")[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None


class _Postgres:
    """A PostgreSQL database shared by every replica: a small pool of connections per process."""

    types = {"pk": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "blob": "BYTEA",
             "real": "DOUBLE PRECISION"}
    LOCK_KEY = 0x63617074696F6E  # pg_advisory_xact_lock key of migrations and experiment state: "caption"

    def __init__(self, url: str, pool_size: int, timeout_s: float):
        try:
            import psycopg
        except ImportError:
            raise StoreError(f"{redact(url)}: a PostgreSQL store needs psycopg 3: "
                             f"pip install \"captioner[postgres]\"") from None
        self.psycopg, self.url, self.timeout_s = psycopg, url, timeout_s
        self.name = redact(url)
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(pool_size)

    def _connect(self) -> Any:
        try:
            return self.psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.timeout_s)))
        except self.psycopg.ProgrammingError as e:  # a malformed URL
            raise StoreError(f"{self.name}: not a valid PostgreSQL URL: {_one_line(e, self.url)}") from None
        except self.psycopg.OperationalError as e:
            raise StoreUnavailable(f"cannot reach the feedback database {self.name}: {_one_line(e, self.url)}") from None

    @contextmanager
    def transaction(self, write: bool) -> Iterator[_Tx]:
        """A pooled connection in one transaction (committed when the block ends)."""
        if not self._slots.acquire(timeout=self.timeout_s):
            raise StoreUnavailable(f"every connection to the feedback database {self.name} is busy; retry shortly")
        conn = None
        try:
            with self._lock:
                while self._idle and conn is None:
                    conn = self._idle.pop()
                    if conn.closed or conn.broken:
                        conn = None
            conn = conn or self._connect()
            try:
                with conn.transaction():
                    yield _Tx(conn, True)
            except self.psycopg.OperationalError as e:  # connection lost, server shutting down
                conn.close()
                raise StoreUnavailable(f"the feedback database {self.name} failed: {_one_line(e, self.url)}") from None
        finally:
            if conn is not None:
                if conn.closed or conn.broken:
                    conn.close()
                else:
                    with self._lock:
                        self._idle.append(conn)
            self._slots.release()

    def has_table(self, tx: _Tx, name: str) -> bool:
        return tx.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None

    def exclusive(self, tx: _Tx) -> None:
        """Serialise this write transaction with every other that asks (migrations, experiment
        state: two replicas promoting at once must not both win)."""
        tx.execute("SELECT pg_advisory_xact_lock(?)", (self.LOCK_KEY,))  # held until this transaction ends

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


def sqlite_path(db: str | Path, create: bool) -> Path:
    """The SQLite file `db` names, refused by name where it cannot be one: a URL of another
    scheme, an empty path, a folder, a file that is not a SQLite database (left untouched: it is
    never opened), or (without `create`) a file that does not exist."""
    if is_url(db):
        raise StoreError(f"{redact(db)}: unsupported feedback store URL {str(db).split('://')[0]}://; "
                         f"give {STORE_FORMS}")
    if not str(db):
        raise StoreError(f"the feedback store's path is empty: give {STORE_FORMS}")
    if "\0" in str(db):
        raise StoreError(f"{str(db)!r}: a file path cannot hold a NUL character: give {STORE_FORMS}")
    path = Path(db).expanduser()
    if path.is_dir():
        raise StoreError(f"{path}: a folder, not a file: give the feedback store's file, e.g. {path / 'captioner.db'}")
    if path.exists() and not path.is_file():
        raise StoreError(f"{path}: not a regular file: give {STORE_FORMS}")
    if not path.exists():
        if not create:
            raise StoreError(f"{path}: feedback database not found")
        return path
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise StoreError(f"{path}: cannot read the feedback database: {e.strerror}") from None
    if head and head != SQLITE_HEADER:  # an empty file is an empty database to SQLite
        raise StoreError(f"{path}: not a SQLite database (a file of something else; it was left as it is): "
                         f"give the feedback store's file, or a new path for a new store")
    return path


# --- the store ---------------------------------------------------------------------------------

class FeedbackStore:
    """The feedback and A/B store on SQLite (a file path) or PostgreSQL (a postgresql:// URL).

    `create=False` refuses a SQLite file that does not exist yet (for readers such as ab-report);
    `pool_size` bounds one process's PostgreSQL connections; `busy_timeout_s` is how long a write
    waits for a lock or a free connection before StoreUnavailable."""

    def __init__(self, db: str | Path, busy_timeout_s: float = 10.0, pool_size: int = 8, create: bool = True):
        self.db = db
        self.name = redact(db)
        if is_postgres_url(db):
            self.kind = "postgres"
            self._backend: _SQLite | _Postgres = _Postgres(str(db), pool_size, busy_timeout_s)
        else:
            self.kind = "sqlite"
            path = sqlite_path(db, create)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{path}: cannot create the feedback database's folder: {e.strerror}") from None
            self.path = path
            self._backend = _SQLite(path, busy_timeout_s)
        self.migrate()

    # -- schema --

    def schema_version(self) -> int:
        with self._backend.transaction(write=False) as tx:
            if not self._backend.has_table(tx, "schema_version"):
                return 0
            return int(tx.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)

    def migrate(self) -> int:
        """Apply the migrations this database lacks, each once, under a lock that lets one
        process migrate while the others (replicas starting at once) wait; returns the version."""
        current = self.schema_version()
        if current == SCHEMA_VERSION:
            return current  # the usual case: no write lock taken
        with self._backend.transaction(write=True) as tx:
            self._backend.exclusive(tx)
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                       "description TEXT NOT NULL, applied {real} NOT NULL)".format(**self._backend.types))
            current = int(tx.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0)
            if current > SCHEMA_VERSION:
                raise StoreError(f"{self.name}: the database's schema is version {current}, newer than this "
                                 f"captioner knows ({SCHEMA_VERSION}): upgrade captioner")
            for version, (description, statements) in enumerate(MIGRATIONS[current:], start=current + 1):
                for sql in statements:
                    tx.execute(sql.format(**self._backend.types))
                tx.execute("INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                           (version, description, time.time()))
        return max(current, SCHEMA_VERSION)

    def select(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one read-only query (? placeholders), on either backend: for tests and tools."""
        with self._backend.transaction(write=False) as tx:
            return [tuple(r) for r in tx.execute(sql, args).fetchall()]

    # -- captions and feedback --

    def record_caption(self, s: Served) -> str:
        """Store a served caption (and its photo, once per distinct photo); returns its id.
        Committed before it returns."""
        caption_id = uuid.uuid4().hex
        now = time.time()
        sha = hashlib.sha256(s.image).hexdigest() if s.image is not None else None
        with self._backend.transaction(write=True) as tx:
            if s.image is not None:
                tx.execute("INSERT INTO images (sha256, bytes, created) VALUES (?, ?, ?) "
                           "ON CONFLICT (sha256) DO NOTHING", (sha, s.image, now))
            tx.execute(
                "INSERT INTO captions (id, created, source, client, experiment, variant, assigned, model, "
                "model_version, image_sha256, caption, score, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (caption_id, now, s.source, client_hash(s.client), s.experiment, s.variant, int(s.assigned),
                 s.model, s.model_version, sha, s.caption, float(s.score), json.dumps(s.options, sort_keys=True)))
        return caption_id

    def add_feedback(self, caption_id: str, rating: int | None = None, correction: str | None = None) -> int:
        """Store a rating (1-5) and/or a corrected caption for a served caption; returns its row id.
        Committed before it returns."""
        if rating is None and not (correction and correction.strip()):
            raise FeedbackError("feedback needs a rating (1-5) or a corrected caption")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5):
            raise FeedbackError(f"rating must be an integer from 1 to 5, not {rating!r}")
        for name, text in (("caption_id", caption_id), ("correction", correction)):
            problem = text_problem(text) if isinstance(text, str) else None
            if problem:
                raise FeedbackError(f"{name} {problem}")
        correction = correction.strip() if correction and correction.strip() else None
        if correction is not None and len(correction) > MAX_CORRECTION_CHARS:
            raise FeedbackError(f"correction is {len(correction)} characters long; at most {MAX_CORRECTION_CHARS}")
        if correction is not None and not tokenize(correction):
            raise FeedbackError("correction holds no words (only punctuation or symbols): send the caption the "
                                "photo should have had")
        with self._backend.transaction(write=False) as tx:
            known = tx.execute("SELECT 1 FROM captions WHERE id = ?", (caption_id,)).fetchone() is not None
        if not known:
            raise FeedbackError(f"no caption with id {caption_id!r}")
        with self._backend.transaction(write=True) as tx:
            row = tx.execute("INSERT INTO feedback (caption_id, created, rating, correction) VALUES (?, ?, ?, ?) "
                             "RETURNING id", (caption_id, time.time(), rating, correction)).fetchone()
        return int(row[0])

    def caption(self, caption_id: str) -> dict | None:
        keys = ("id", "source", "experiment", "variant", "assigned", "model", "model_version", "image_sha256",
                "caption", "score", "options")
        rows = self.select(f"SELECT {', '.join(keys)} FROM captions WHERE id = ?", (caption_id,))
        if not rows:
            return None
        out = dict(zip(keys, rows[0]))
        out["options"] = json.loads(out["options"])
        return out

    def experiments(self) -> list[str]:
        return [r[0] for r in self.select("SELECT DISTINCT experiment FROM captions ORDER BY experiment")]

    def traffic(self, experiment: str) -> dict[str, int]:
        """Captions served per variant, counting only clients the experiment assigned."""
        rows = self.select("SELECT variant, COUNT(*) FROM captions WHERE experiment = ? AND assigned = 1 "
                           "GROUP BY variant", (experiment,))
        return {v: int(n) for v, n in rows}

    def ratings(self, experiment: str) -> dict[str, list[int]]:
        """Ratings per variant (assigned traffic only); a caption rated twice counts its last rating."""
        rows = self.select(
            "SELECT c.variant, f.rating FROM feedback f JOIN captions c ON c.id = f.caption_id "
            "WHERE c.experiment = ? AND c.assigned = 1 AND f.rating IS NOT NULL AND f.id = "
            "(SELECT MAX(g.id) FROM feedback g WHERE g.caption_id = f.caption_id AND g.rating IS NOT NULL) "
            "ORDER BY f.id", (experiment,))
        out: dict[str, list[int]] = {}
        for variant, rating in rows:
            out.setdefault(variant, []).append(int(rating))
        return out

    def corrections(self) -> list[Correction]:
        """Every corrected caption with its photo (the latest correction per caption)."""
        rows = self.select(
            "SELECT f.caption_id, i.bytes, f.correction FROM feedback f JOIN captions c ON c.id = f.caption_id "
            "JOIN images i ON i.sha256 = c.image_sha256 WHERE f.correction IS NOT NULL AND f.id = "
            "(SELECT MAX(g.id) FROM feedback g WHERE g.caption_id = f.caption_id AND g.correction IS NOT NULL) "
            "ORDER BY f.id")
        return [Correction(cid, bytes(img), text) for cid, img, text in rows]

    # -- A/B: sticky assignments, promotion, retirement --

    def experiment_state(self, experiment: str) -> ExperimentState:
        rows = self.select("SELECT variant, status FROM ab_variants WHERE experiment = ? AND status != 'live'",
                           (experiment,))
        return ExperimentState(experiment, dict(rows))

    def lookup(self, experiment: str, client: str) -> tuple[str | None, ExperimentState]:
        """The client's stored variant (None: not assigned yet) and the experiment's state, read together."""
        with self._backend.transaction(write=False) as tx:
            row = tx.execute("SELECT variant FROM ab_assignments WHERE experiment = ? AND client = ?",
                             (experiment, client_hash(client))).fetchone()
            status = tx.execute("SELECT variant, status FROM ab_variants WHERE experiment = ? AND status != 'live'",
                                (experiment,)).fetchall()
        return (row[0] if row else None), ExperimentState(experiment, {v: s for v, s in status})

    def assign_once(self, experiment: str, client: str, variant: str, replace: str | None = None) -> str:
        """Store `variant` as the client's unless it already has one (or, with `replace`, unless it
        has one other than `replace`); returns the variant stored now. Replicas racing on one new
        client all read back the one row that won."""
        h = client_hash(client)
        with self._backend.transaction(write=True) as tx:
            if replace is None:
                tx.execute("INSERT INTO ab_assignments (experiment, client, variant, created) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (experiment, client) DO NOTHING", (experiment, h, variant, time.time()))
            else:
                tx.execute("UPDATE ab_assignments SET variant = ?, created = ? "
                           "WHERE experiment = ? AND client = ? AND variant = ?",
                           (variant, time.time(), experiment, h, replace))
            return tx.execute("SELECT variant FROM ab_assignments WHERE experiment = ? AND client = ?",
                              (experiment, h)).fetchone()[0]

    def known_variants(self, experiment: str) -> set[str]:
        """Every variant the store has seen in an experiment: served, assigned, promoted or retired."""
        rows = self.select("SELECT variant FROM captions WHERE experiment = ? UNION "
                           "SELECT variant FROM ab_assignments WHERE experiment = ? UNION "
                           "SELECT variant FROM ab_variants WHERE experiment = ?", (experiment,) * 3)
        return {r[0] for r in rows}

    def _set_status(self, tx: _Tx, experiment: str, variant: str, status: str, action: str | None) -> None:
        now = time.time()
        tx.execute("INSERT INTO ab_variants (experiment, variant, status, updated) VALUES (?, ?, ?, ?) "
                   "ON CONFLICT (experiment, variant) DO UPDATE SET status = excluded.status, updated = excluded.updated",
                   (experiment, variant, status, now))
        if action:
            tx.execute("INSERT INTO ab_events (experiment, variant, action, created) VALUES (?, ?, ?, ?)",
                       (experiment, variant, action, now))

    def _check_known(self, experiment: str, variant: str, variants: Sequence[str] | None) -> list[str]:
        known = sorted(variants if variants is not None else self.known_variants(experiment))
        if variant not in known:
            raise ExperimentStateError(
                f"no variant {variant!r} in experiment {experiment!r}"
                + (f"; it has {', '.join(known)}" if known else "; the store has seen no traffic for it yet"))
        return known

    def promote(self, experiment: str, variant: str, retire_others: bool = False,
                variants: Sequence[str] | None = None) -> ExperimentState:
        """Make `variant` the default for new traffic (every replica reads it on its next request);
        clients already assigned keep their variant until it is retired. `retire_others` retires
        every other variant too. `variants`: the experiment's variants (default: those the store has seen)."""
        known = self._check_known(experiment, variant, variants)
        with self._backend.transaction(write=True) as tx:
            self._backend.exclusive(tx)
            tx.execute("UPDATE ab_variants SET status = 'live', updated = ? "
                       "WHERE experiment = ? AND status = 'promoted' AND variant != ?", (time.time(), experiment, variant))
            self._set_status(tx, experiment, variant, "promoted", "promote")
            if retire_others:
                for other in known:
                    if other != variant:
                        self._set_status(tx, experiment, other, "retired", "retire")
        return self.experiment_state(experiment)

    def retire(self, experiment: str, variant: str,
               variants: Sequence[str] | Mapping[str, float] | None = None) -> ExperimentState:
        """Take `variant` out of service: no new traffic, and its sticky clients move to another
        variant on their next request. Refused for the promoted variant and for the last live one:
        where `variants` maps the served experiment's variants to their weights, a variant at
        weight 0 takes no traffic and does not count as live."""
        known = self._check_known(experiment, variant, variants)
        weights = variants if isinstance(variants, Mapping) else {}
        with self._backend.transaction(write=True) as tx:
            self._backend.exclusive(tx)  # two replicas retiring the last two variants at once: one wins
            status = dict(tx.execute("SELECT variant, status FROM ab_variants WHERE experiment = ?",
                                     (experiment,)).fetchall())
            if status.get(variant) == "promoted":
                raise ExperimentStateError(f"{variant!r} is the promoted variant of {experiment!r}: promote "
                                           f"another one before retiring it")
            live = [v for v in known if v != variant and status.get(v, "live") != "retired"
                    and (weights.get(v, 1.0) > 0 or status.get(v) == "promoted")]
            if not live:
                raise ExperimentStateError(f"retiring {variant!r} would leave experiment {experiment!r} no live "
                                           f"variant that takes traffic")
            self._set_status(tx, experiment, variant, "retired", "retire")
        return self.experiment_state(experiment)

    def close(self) -> None:
        """Close the store's connections (it reopens them on next use)."""
        self._backend.close()
