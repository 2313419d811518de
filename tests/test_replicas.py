"""Several server replicas on one store: the same A/B variant for a user on every replica, a
promotion or retirement seen by all of them without a restart, feedback sent to any of them in one
ab-report, and no acknowledged row lost when one replica is killed (PostgreSQL, `captioner serve`)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from captioner.cli import main  # noqa: E402
from captioner.service.config import load_serve_config  # noqa: E402
from captioner.service.feedback import FeedbackStore  # noqa: E402
from captioner.service.serve import create_app  # noqa: E402

from conftest import make_photo  # noqa: E402
from reliability import count  # noqa: E402
from servers import Running, Subprocess, tiny_checkpoint, write_config  # noqa: E402

FAST = {"beam_size": "1", "max_len": "5"}


def two_variant_config(tmp: Path, db: str) -> Path:
    """A serve config with two tiny random models as control and candidate, on store `db`."""
    (tmp / "models").mkdir(exist_ok=True)
    tiny_checkpoint(tmp / "models" / "control.pt", seed=0)
    tiny_checkpoint(tmp / "models" / "candidate.pt", seed=1)
    return write_config(tmp / "serve.json", model_dir="models", db=db, max_wait_ms=1, experiment={
        "name": "loop", "variants": [{"name": "control", "checkpoint": "control.pt"},
                                     {"name": "candidate", "checkpoint": "candidate.pt"}]})


def photo(tmp: Path, i: int) -> bytes:
    path = tmp / f"{i}.jpg"
    make_photo(path, ["red", "blue", "green"][i % 3], ["square", "circle"][i % 2], seed=i)
    return path.read_bytes()


def caption(client: httpx.Client, user: str, data: bytes) -> dict:
    r = client.post("/v1/captions", files={"image": ("p.jpg", data, "image/jpeg")}, data=FAST,
                    headers={"X-Client-Id": user})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_replicas_agree_on_variants_and_see_a_promotion_without_restart(store_db, tmp_path, capsys):
    config = two_variant_config(tmp_path, store_db)
    servers = [Running(create_app(load_serve_config(config))) for _ in range(2)]
    clients = [httpx.Client(base_url=s.url, timeout=60) for s in servers]
    a, b = clients
    pic = photo(tmp_path, 0)
    try:
        users = [f"user-{i}" for i in range(12)]

        def variants(user: str) -> tuple[str, str]:
            return caption(a, user, pic)["variant"], caption(b, user, pic)["variant"]

        before = {u: variants(u) for u in users}
        assert all(x == y for x, y in before.values()), before  # the same on both replicas
        before = {u: v[0] for u, v in before.items()}
        assert set(before.values()) == {"control", "candidate"}

        assert main(["promote", "candidate", "--config", str(config)]) == 0  # while both run
        for c in clients:
            listed = {v["name"]: (v["status"], v["new_traffic_weight"]) for v in c.get("/v1/models").json()["variants"]}
            assert listed == {"candidate": ("promoted", 1.0), "control": ("live", 0.0)}
        assert {u: variants(u) for u in users} == {u: (v, v) for u, v in before.items()}  # sticky users keep theirs
        assert {variants(f"new-{i}") for i in range(8)} == {("candidate", "candidate")}

        assert main(["retire", "control", "--config", str(config)]) == 0
        assert {variants(u) for u in users} == {("candidate", "candidate")}  # control's users moved, on both

        # feedback sent to either replica lands in one report
        sent = 0
        for i, u in enumerate(users):
            for c in clients:
                cid = caption(c, u, pic)["caption_id"]
                assert c.post("/v1/feedback", json={"caption_id": cid, "rating": 1 + i % 5}).status_code == 200
                sent += 1
        capsys.readouterr()
        assert main(["ab-report", "--db", store_db, "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        by_name = {v["variant"]: v for v in rep["variants"]}
        assert by_name["candidate"]["stats"]["n"] == sent and by_name["candidate"]["status"] == "promoted"
        assert by_name["control"]["status"] == "retired"
        assert sum(v["captions"] for v in rep["variants"]) == 2 * len(users) * 3 + 2 * 8 + 2 * len(users)
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop()


@pytest.mark.postgres
@pytest.mark.slow
def test_two_serve_processes_on_postgres_share_users_and_lose_nothing_when_one_is_killed(pg_cluster, tmp_path,
                                                                                       capsys):
    """Two `captioner serve` processes on one PostgreSQL database under load from users who go
    to either one: each user gets one variant on both; then one replica is SIGKILLed mid-load;
    every caption and feedback row it acknowledged is in the database, and ab-report counts the
    feedback of both."""
    url = pg_cluster.database()
    config = two_variant_config(tmp_path, url)
    log = tmp_path / "servers.log"
    replicas = [Subprocess(config, log, env={"CAPTIONER_API_KEYS": ""}) for _ in range(2)]
    pics = [photo(tmp_path, i) for i in range(4)]
    captions, feedback, unexpected = set(), set(), []
    variant_of: dict[str, set[str]] = {}
    lock, stop = threading.Lock(), threading.Event()

    def user(k: int) -> None:
        conns = [httpx.Client(base_url=r.url, timeout=60) for r in replicas]
        i = 0
        while not stop.is_set():
            i += 1
            name = f"user-{k}-{i % 3}"  # three users per thread, each sent to both replicas in turn
            c = conns[i % 2]
            try:
                r = c.post("/v1/captions", files={"image": ("p.jpg", pics[(k + i) % 4])}, data=FAST,
                           headers={"X-Client-Id": name})
                count("requests")
                if r.status_code != 200:
                    unexpected.append(r.status_code)
                    continue
                body = r.json()
                with lock:
                    captions.add(body["caption_id"])
                    variant_of.setdefault(name, set()).add(body["variant"])
                r = c.post("/v1/feedback", json={"caption_id": body["caption_id"], "rating": 1 + i % 5})
                count("requests")
                if r.status_code == 200:
                    with lock:
                        feedback.add(r.json()["feedback_id"])
                else:
                    unexpected.append(r.status_code)
            except httpx.HTTPError:
                if i % 2 == 0:
                    continue  # replica 0 was killed: this user's next request goes to the other one
                raise
        for c in conns:
            c.close()

    threads = [threading.Thread(target=user, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while len(feedback) < 40 and time.time() < deadline:
            time.sleep(0.05)
        replicas[0].kill()  # SIGKILL mid-load, as a crash or the OOM killer would
        count("faults")
        with lock:
            acknowledged_before_kill = len(feedback)
        deadline = time.time() + 60
        while len(feedback) < acknowledged_before_kill + 12 and time.time() < deadline:
            time.sleep(0.05)  # the survivor goes on serving everyone
        stop.set()
        for t in threads:
            t.join(60)
    finally:
        stop.set()
        for r in replicas:
            r.stop()
    assert not unexpected and acknowledged_before_kill >= 40, (unexpected, acknowledged_before_kill)
    assert len(feedback) >= acknowledged_before_kill + 12  # the other replica kept serving
    assert all(len(v) == 1 for v in variant_of.values()), variant_of  # one variant per user on both replicas
    assert {v for vs in variant_of.values() for v in vs} == {"control", "candidate"}

    store = FeedbackStore(url)
    stored_captions = {r[0] for r in store.select("SELECT id FROM captions")}
    stored_feedback = {r[0] for r in store.select("SELECT id FROM feedback")}
    assigned = dict(store.select("SELECT client, variant FROM ab_assignments WHERE experiment = 'loop'"))
    store.close()
    lost = (captions - stored_captions, feedback - stored_feedback)
    count("failures", len(lost[0]) + len(lost[1]))
    assert lost == (set(), set()), f"acknowledged but lost: {lost}"
    assert len(assigned) == len(variant_of)  # one stored assignment per user, whichever replica came first

    capsys.readouterr()
    assert main(["ab-report", "--db", url, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    # every rating either replica acknowledged is in the one report (plus any whose reply the kill cut off)
    assert len(feedback) <= sum(v["stats"]["n"] for v in rep["variants"]) <= len(feedback) + len(threads)
    assert sum(v["captions"] for v in rep["variants"]) == len(stored_captions)
