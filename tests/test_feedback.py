"""The feedback store on SQLite and on PostgreSQL: records, feedback checks, concurrent writers,
versioned migrations."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from captioner.service.feedback import FeedbackError, FeedbackStore, Served

WRITER = """
import sys
from captioner.service.feedback import FeedbackStore, Served
store = FeedbackStore(sys.argv[1])
for i in range(40):
    cid = store.record_caption(Served("api", f"p{sys.argv[2]}", "exp", "v", True, "m", "1", "c", -1.0, {},
                                      image=f"photo-{i % 5}".encode()))
    store.add_feedback(cid, rating=1 + i % 5)
"""


def test_concurrent_writers_lose_nothing(store_db):
    db = store_db
    FeedbackStore(db).close()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(k)], stderr=subprocess.PIPE)
             for k in range(3)]
    store = FeedbackStore(db)

    def thread_writer(k: int) -> None:
        for i in range(40):
            cid = store.record_caption(Served("app", f"t{k}", "exp", "v", True, "m", "1", "c", -1.0, {},
                                              image=f"photo-{i % 5}".encode()))
            store.add_feedback(cid, rating=1 + i % 5)

    threads = [threading.Thread(target=thread_writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    assert store.select("SELECT COUNT(*) FROM captions") == [(240,)]
    assert store.select("SELECT COUNT(*) FROM feedback") == [(240,)]
    assert store.select("SELECT COUNT(*) FROM images") == [(5,)]  # one row per distinct photo
    assert sorted(store.ratings("exp")["v"]) == sorted([1 + i % 5 for i in range(40)] * 6)
    store.close()


def test_feedback_is_checked_and_the_latest_correction_wins(store_db):
    store = FeedbackStore(store_db)
    cid = store.record_caption(Served("api", "x", "exp", "v", True, "m", "1", "a dog", -2.0, {"beam_size": 3},
                                      image=b"jpeg-bytes"))
    assert store.caption(cid)["options"] == {"beam_size": 3}
    with pytest.raises(FeedbackError, match="no caption"):
        store.add_feedback("missing", rating=3)
    for bad in (0, 6, True, 2.5):
        with pytest.raises(FeedbackError, match="1 to 5"):
            store.add_feedback(cid, rating=bad)
    with pytest.raises(FeedbackError, match="rating"):
        store.add_feedback(cid, correction="   ")
    store.add_feedback(cid, correction="a cat")
    store.add_feedback(cid, rating=2, correction="a grey cat on a sofa")
    store.add_feedback(cid, rating=4)
    (only,) = store.corrections()
    assert (only.caption_id, only.image, only.caption) == (cid, b"jpeg-bytes", "a grey cat on a sofa")
    assert store.ratings("exp") == {"v": [4]}  # a caption rated twice counts once, its last rating
    store.close()


@pytest.mark.reliability
def test_connections_of_ended_threads_are_closed(tmp_path):
    """A server's worker threads come and go (idle ones exit): their connections must not pile
    up (each holds a page cache and file handles)."""
    import os

    from reliability import count

    store = FeedbackStore(tmp_path / "f.db")

    def write_once(i: int) -> None:
        store.record_caption(Served("api", f"t{i}", "exp", "v", True, "m", "1", "c", -1.0, {}))

    fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # noqa: E731
    for i in range(40):
        t = threading.Thread(target=write_once, args=(i,))
        t.start()
        t.join()
    before = fds()
    for i in range(40, 80):
        t = threading.Thread(target=write_once, args=(i,))
        t.start()
        t.join()
    count("inputs", 80)
    assert len(store._backend._all) <= 2  # the main thread's and the last writer's
    assert fds() <= before + 3
    assert store.select("SELECT COUNT(*) FROM captions") == [(80,)]
    store.close()


# --- versioned migrations -----------------------------------------------------------------------

# What captioner 0.2 wrote (no schema_version table): opening it must keep every row.
SCHEMA_0_2 = """
CREATE TABLE images (sha256 TEXT PRIMARY KEY, bytes BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE captions (id TEXT PRIMARY KEY, created REAL NOT NULL, source TEXT NOT NULL, client TEXT NOT NULL,
    experiment TEXT NOT NULL, variant TEXT NOT NULL, assigned INTEGER NOT NULL, model TEXT NOT NULL,
    model_version TEXT NOT NULL, image_sha256 TEXT REFERENCES images(sha256), caption TEXT NOT NULL,
    score REAL NOT NULL, options TEXT NOT NULL);
CREATE TABLE feedback (id INTEGER PRIMARY KEY AUTOINCREMENT, caption_id TEXT NOT NULL REFERENCES captions(id),
    created REAL NOT NULL, rating INTEGER CHECK (rating IS NULL OR rating BETWEEN 1 AND 5), correction TEXT);
INSERT INTO images VALUES ('abc', x'ffd8', 1.0);
INSERT INTO captions VALUES ('c1', 1.0, 'api', 'h', 'exp', 'control', 1, 'm', 'v', 'abc', 'a dog', -1.0, '{}');
INSERT INTO feedback (caption_id, created, rating, correction) VALUES ('c1', 2.0, 4, 'a brown dog');
"""


def test_a_store_written_before_versioning_is_migrated_in_place(tmp_path):
    import sqlite3

    from captioner.service.feedback import SCHEMA_VERSION

    with sqlite3.connect(tmp_path / "old.db") as db:
        db.executescript(SCHEMA_0_2)
    store = FeedbackStore(tmp_path / "old.db")
    assert store.schema_version() == SCHEMA_VERSION >= 2
    assert [v for (v,) in store.select("SELECT version FROM schema_version ORDER BY version")] == \
        list(range(1, SCHEMA_VERSION + 1))
    assert store.ratings("exp") == {"control": [4]}
    (c,) = store.corrections()
    assert (c.caption_id, c.image, c.caption) == ("c1", b"\xff\xd8", "a brown dog")
    assert store.add_feedback("c1", rating=5) == 2  # ids go on from the old rows
    assert store.assign_once("exp", "u", "control") == "control"  # the A/B tables came with it
    store.close()


MIGRATOR = """
import sys
from captioner.service.feedback import FeedbackStore
store = FeedbackStore(sys.argv[1])
print(store.schema_version())
"""


def test_replicas_starting_at_once_migrate_once(store_db):
    """Four processes open one fresh database at the same moment: one migrates, the others wait
    for its lock and find the schema done; every migration is recorded exactly once."""
    from captioner.service.feedback import SCHEMA_VERSION

    procs = [subprocess.Popen([sys.executable, "-c", MIGRATOR, store_db], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e.decode()[-800:] for _, e in outs]
    assert {o.decode().strip() for o, _ in outs} == {str(SCHEMA_VERSION)}
    store = FeedbackStore(store_db)
    assert store.select("SELECT version, COUNT(*) FROM schema_version GROUP BY version ORDER BY version") == \
        [(v, 1) for v in range(1, SCHEMA_VERSION + 1)]
    store.close()


def test_a_newer_schema_is_refused_by_name(store_db):
    from captioner.service.feedback import SCHEMA_VERSION, StoreError

    store = FeedbackStore(store_db)
    with store._backend.transaction(write=True) as tx:
        tx.execute("INSERT INTO schema_version (version, description, applied) VALUES (?, ?, ?)",
                   (SCHEMA_VERSION + 1, "from the future", 0.0))
    store.close()
    with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1}, newer than this captioner knows"):
        FeedbackStore(store_db)


@pytest.mark.postgres
def test_an_unreachable_or_bad_postgres_url_is_a_clear_error_without_the_password(capsys):
    pytest.importorskip("psycopg")
    from captioner.cli import main
    from captioner.service.feedback import StoreError, StoreUnavailable
    from servers import free_port

    url = f"postgresql://someone:s3cret-pw@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    with pytest.raises(StoreUnavailable, match="cannot reach the feedback database") as e:
        FeedbackStore(url, busy_timeout_s=2)
    assert "s3cret-pw" not in str(e.value) and "someone:***@127.0.0.1" in str(e.value)
    assert main(["ab-report", "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the feedback database") and "s3cret-pw" not in err
    with pytest.raises(StoreError, match="not a valid PostgreSQL URL"):
        FeedbackStore("postgresql://x@127.0.0.1/db?nonsense_option=1")
    with pytest.raises(StoreError, match="not a valid PostgreSQL URL") as e:  # libpq quotes the URL it cannot parse
        FeedbackStore("postgresql://someone:s3cret-pw@[::1/db")
    assert "s3cret-pw" not in str(e.value)


def test_the_store_refuses_text_either_backend_would_fail_on(store_db):
    """NUL is refused by PostgreSQL (psycopg.DataError) and taken by SQLite; a lone surrogate is
    not UTF-8 for either: both backends refuse them alike, before a transaction, naming the field
    (the web app stores feedback through here, not through the API)."""
    store = FeedbackStore(store_db)
    cid = store.record_caption(Served("api", "x", "exp", "v", True, "m", "1", "a dog", -2.0, {}))
    for kw, field in (({"correction": "a cat\0 on a mat"}, "correction"), ({"correction": "a \ud800 cat"}, "correction"),
                      ({"correction": "a \x1b[31mred\x1b[0m cat"}, "correction")):
        with pytest.raises(FeedbackError, match=f"^{field} holds a"):
            store.add_feedback(cid, **kw)
    with pytest.raises(FeedbackError, match="^caption_id holds a control character"):
        store.add_feedback("x\0y", rating=3)
    store.add_feedback(cid, correction="a dog\ton the\nsofa")
    assert store.select("SELECT correction FROM feedback") == [("a dog\ton the\nsofa",)]
    store.close()


SERVE = """
import contextlib, io, sys
from captioner.cli import main
for db in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["serve", "--db", db, "--port", "0"])
    print(rc, err.getvalue().strip())
"""


def test_a_db_that_cannot_be_a_store_is_refused_by_name_and_left_untouched(tmp_path, monkeypatch, capsys):
    """Every command opens its store in one place (FeedbackStore), which refuses, naming the
    value, a URL of a scheme it does not serve (not a new SQLite file `./mysql:/x/y`), an empty
    path or a folder (not "busy, retry"), a file that is not SQLite (never opened: left as it was)."""
    import re

    from captioner.cli import main
    from captioner.service.config import load_serve_config
    from captioner.service.feedback import StoreError

    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"shopping: milk, eggs\n" * 50)
    folder = tmp_path / "folder"
    folder.mkdir()
    forms = "a SQLite file path (e.g. captioner.db) or a postgresql:// (or postgres://) URL"
    cases = {str(notes): f"{notes}: not a SQLite database", "": "the feedback store's path is empty",
             str(folder): f"{folder}: a folder, not a file", "mysql://me:s3cret-pw@x/y": f"unsupported feedback "
             f"store URL mysql://; give {forms}", "sqlite:///x.db": "unsupported feedback store URL sqlite://"}
    for db, says in cases.items():
        for create in (True, False):
            with pytest.raises(StoreError, match=re.escape(says)) as e:
                FeedbackStore(db, create=create)
            assert "s3cret-pw" not in str(e.value)
    config = tmp_path / "serve.toml"
    config.write_text('db = "mysql://x/y"\n')
    assert load_serve_config(config).db == "mysql://x/y"  # not a path beside the config: refused when opened
    for argv in (["ab-report", "--db", str(notes)], ["promote", "v", "--db", str(notes), "--experiment", "e"],
                 ["app", "--db", str(notes)],  # before streamlit starts
                 ["retire", "v", "--config", str(config)],
                 ["finetune", "--db", str(notes), "--out", str(tmp_path / "new.pt")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("not a SQLite database" in err or "mysql://" in err), (argv, err)
    run = subprocess.run([sys.executable, "-c", SERVE, *cases], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    replies = run.stdout.strip().splitlines()
    assert len(replies) == len(cases) and all(r.startswith("2 error: ") for r in replies), replies
    for reply, says in zip(replies, cases.values()):
        assert says in reply and "busy" not in reply and "s3cret-pw" not in reply
    assert notes.read_bytes() == b"shopping: milk, eggs\n" * 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt", "serve.toml"]  # no ./mysql:/x/y
    assert not list(folder.iterdir())
    damaged = tmp_path / "damaged.db"  # SQLite's header, then junk
    damaged.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200)
    with pytest.raises(StoreError, match="damaged.db: not a usable SQLite database"):
        FeedbackStore(damaged)
    assert damaged.read_bytes() == b"SQLite format 3\x00" + b"\xff" * 200
    FeedbackStore(tmp_path / "new.db").close()  # a new path is a new store; an empty file an empty one
    (tmp_path / "empty.db").touch()
    FeedbackStore(tmp_path / "empty.db", create=False).close()
