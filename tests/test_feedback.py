"""The SQLite feedback store: records, feedback checks, and concurrent writers."""
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


def test_concurrent_writers_lose_nothing(tmp_path):
    db = tmp_path / "f.db"
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
    db_ = store._conn()
    assert db_.execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 240
    assert db_.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 240
    assert db_.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 5  # one row per distinct photo
    assert sorted(store.ratings("exp")["v"]) == sorted([1 + i % 5 for i in range(40)] * 6)
    store.close()


def test_feedback_is_checked_and_the_latest_correction_wins(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
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
    assert len(store._all) <= 2  # the main thread's and the last writer's
    assert fds() <= before + 3
    assert store._conn().execute("SELECT COUNT(*) FROM captions").fetchone()[0] == 80
    store.close()
