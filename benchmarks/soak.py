"""Soak test of `captioner serve`: concurrent clients for a bounded time, mixing valid uploads,
bad ones and feedback. Reports every status seen, server errors (must be zero), feedback
rows acknowledged but not stored (must be zero) and the server's memory (RSS) over time.

    nice -n 19 python benchmarks/soak.py [--seconds 60] [--clients 8] [--model default]
                                         [--out benchmarks/results/soak.json] [--readme]

Starts the server on 127.0.0.1 (a free port, an API key, a fresh SQLite store, the default
limits but a 2 MB body cap) in a child process. Each client thread loops until the time is
up: a valid caption request (multipart upload or a JSON batch of two) followed by a rating or
correction of what it got back, or one of the bad requests below, each of which must get its
own 4xx. After the run the server is stopped and the store is read directly: every caption
and feedback id the server acknowledged must be there.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx


from results_blocks import markers, replace_block

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [p.read_bytes() for p in sorted((REPO / "examples").glob("*.jpg"))]
README = REPO / "docs" / "results.md"  # where the generated blocks live
MARKERS = markers("soak")
MAX_BODY = 2_000_000
MAX_IMAGES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A greyscale PNG; without `rows`, all zero pixels compressed as a stream (a real bomb)."""
    if rows is None:
        comp = zlib.compressobj(9)
        line = b"\0" * (width + 1)
        rows_z = b"".join(comp.compress(line * min(1024, height - i)) for i in range(0, height, 1024)) + comp.flush()
    else:
        rows_z = zlib.compress(rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows_z) + _chunk(b"IEND", b"")


def tiff() -> bytes:
    """A tiny valid greyscale TIFF (a format the server does not accept by default)."""
    entries = [(256, 3, 1, 2), (257, 3, 1, 2), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
               (277, 3, 1, 1), (278, 3, 1, 2), (279, 4, 1, 4)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 12) + b"\x10\x20\x30\x40" + ifd


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Bad:
    """A bad request and the statuses it may get."""

    name: str
    expect: tuple[int, ...]
    files: dict | None = None
    data: dict | None = None
    json: object = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    path: str = "/v1/captions"


def bad_requests() -> list[Bad]:
    cat = PHOTOS[0]
    small = png(8, 8, b"".join(b"\0" + bytes(range(8)) for _ in range(8)))

    def upload(data: bytes, name: str = "p.jpg") -> dict:
        return {"image": (name, data, "application/octet-stream")}

    fast = {"beam_size": "1", "max_len": "8"}
    return [
        Bad("empty photo", (422,), files=upload(b""), data=fast),
        Bad("HTML named .jpg", (415,), files=upload(b"<!doctype html><html>404</html>"), data=fast),
        Bad("truncated JPEG", (422,), files=upload(cat[: len(cat) * 2 // 5]), data=fast),
        Bad("random bytes", (415,), files=upload(os.urandom(3000)), data=fast),
        Bad("TIFF", (415,), files=upload(tiff(), "p.tif"), data=fast),
        Bad("bomb: 3.6 GP header", (413,), files=upload(png(60_000, 60_000, b"\0" * 61)), data=fast),
        Bad("bomb: 81 MP of zeros in 80 kB", (413,), files=upload(png(9000, 9000)), data=fast),
        Bad("body over the cap", (413,), files=upload(os.urandom(MAX_BODY + 200_000)), data=fast),
        Bad("bad base64", (422,), json={"images": ["@@not base64@@"]}),
        Bad("too many photos", (413,), json={"images": [b64(small)] * (MAX_IMAGES + 1)}),
        Bad("beam size 99", (422,), json={"images": [b64(small)], "beam_size": 99}),
        Bad("unknown model", (404,), json={"images": [b64(small)], "model": "../../etc/passwd"}),
        Bad("nested JSON", (422,), content=b"[" * 100_000 + b"]" * 100_000, headers={"Content-Type": "application/json"}),
        Bad("text/plain body", (415,), content=b"hello", headers={"Content-Type": "text/plain"}),
        Bad("no API key", (401,), files=upload(cat), data=fast, headers={"X-API-Key": ""}),
        Bad("wrong API key", (401,), files=upload(cat), data=fast, headers={"X-API-Key": "guess"}),
        Bad("rating 9", (422,), json={"caption_id": "x", "rating": 9}, path="/v1/feedback"),
        Bad("feedback for no caption", (404,), json={"caption_id": "nope", "rating": 3}, path="/v1/feedback"),
    ]


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


class Server:
    """`captioner serve` in a child process on 127.0.0.1."""

    def __init__(self, workdir: Path, model: str, key: str, threads: int):
        self.port = free_port()
        (workdir / "models").mkdir()
        checkpoint = "default"
        if model != "default":
            shutil.copy(model, workdir / "models" / "soak.pt")
            checkpoint = "soak.pt"
        cfg = workdir / "serve.json"
        cfg.write_text(json.dumps({"model_dir": "models", "db": "soak.db", "api_keys": [key], "threads": threads,
                                   "max_body_bytes": MAX_BODY, "max_images": MAX_IMAGES,
                                   "experiment": {"name": "soak", "variants": [{"name": "v", "checkpoint": checkpoint}]}}))
        self.db = workdir / "soak.db"
        self.log = workdir / "server.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("CAPTIONER_API_KEYS", None)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--config", str(cfg),
                                          "--port", str(self.port)], env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start within 180 s")

    def stop(self) -> int:
        """SIGTERM (a graceful stop), as an operator would; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Tally:
    """What the clients saw; shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: dict[str, int] = {}  # "valid 200", "bad: TIFF 415", "feedback 200", ...
        self.server_errors: list[str] = []
        self.unexpected: list[str] = []
        self.transport_errors: list[str] = []
        self.latency_ms: list[float] = []
        self.captions: set[str] = set()
        self.feedback: set[int] = set()
        self.requests = {"valid": 0, "bad": 0, "feedback": 0}

    def saw(self, kind: str, label: str, status: int, ok: bool, body: str) -> None:
        with self.lock:
            self.requests[kind] += 1
            key = f"{label} {status}"
            self.status[key] = self.status.get(key, 0) + 1
            if status >= 500:
                self.server_errors.append(f"{label}: {status} {body[:200]}")
            elif not ok:
                self.unexpected.append(f"{label}: {status} {body[:200]}")


def client(url: str, key: str, stop_at: float, seed: int, tally: Tally, bads: list[Bad]) -> None:
    rng = random.Random(seed)
    http = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120)
    while time.monotonic() < stop_at:
        try:
            if rng.random() < 0.5:
                valid(http, rng, tally)
            else:
                b = rng.choice(bads)
                r = http.post(b.path, files=b.files, data=b.data, json=b.json, content=b.content,
                              headers=b.headers)
                ok = r.status_code in b.expect and set(r.json()) == {"error", "detail"}
                tally.saw("bad", f"bad: {b.name}", r.status_code, ok, r.text)
        except (httpx.HTTPError, ValueError) as e:
            with tally.lock:
                tally.transport_errors.append(f"{type(e).__name__}: {e}")
            http.close()
            http = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120)
    http.close()


def valid(http: httpx.Client, rng: random.Random, tally: Tally) -> None:
    beam = rng.choice([1, 2, 3])
    t0 = time.perf_counter()
    if rng.random() < 0.8:
        r = http.post("/v1/captions", files={"image": ("p.jpg", rng.choice(PHOTOS), "image/jpeg")},
                      data={"beam_size": str(beam), "max_len": "20"})
        results = [r.json()] if r.status_code == 200 else []
    else:
        r = http.post("/v1/captions", json={"images": [b64(rng.choice(PHOTOS)) for _ in range(2)],
                                            "beam_size": beam, "max_len": 20})
        results = r.json()["results"] if r.status_code == 200 else []
    ok = r.status_code == 200 and all(x.get("caption") and x.get("caption_id") for x in results)
    tally.saw("valid", "valid", r.status_code, ok, r.text)
    if not ok:
        return
    with tally.lock:
        tally.latency_ms.append(1000 * (time.perf_counter() - t0))
        tally.captions.update(x["caption_id"] for x in results)
    for x in results:
        body = {"caption_id": x["caption_id"], "rating": rng.randint(1, 5)}
        if rng.random() < 0.3:
            body["correction"] = f"a photo, corrected {rng.randrange(10**6)}"
        f = http.post("/v1/feedback", json=body)
        ok = f.status_code == 200 and f.json().get("caption_id") == x["caption_id"]
        tally.saw("feedback", "feedback", f.status_code, ok, f.text)
        if ok:
            with tally.lock:
                tally.feedback.add(f.json()["feedback_id"])


def sample_memory(pid: int, stop: threading.Event, samples: list[list[float]], t0: float) -> None:
    while not stop.is_set():
        try:
            samples.append([round(time.monotonic() - t0, 1), round(rss_bytes(pid) / 2 ** 20, 1)])
        except (OSError, StopIteration, ValueError):
            pass
        stop.wait(1.0)


def trend(samples: list[list[float]]) -> float | None:
    """Least-squares slope of RSS over time during the load, in MB per minute (after the first
    tenth, which is the allocator warming up)."""
    pts = samples[max(1, len(samples) // 10):]
    if len(pts) < 3:
        return None
    ts, ms = [t for t, _ in pts], [m for _, m in pts]
    mt, mm = statistics.fmean(ts), statistics.fmean(ms)
    var = sum((t - mt) ** 2 for t in ts)
    return round(60 * sum((t - mt) * (m - mm) for t, m in pts) / var, 1) if var else None


def stored(db: Path) -> tuple[set[str], set[int], str]:
    with sqlite3.connect(db) as con:
        captions = {r[0] for r in con.execute("SELECT id FROM captions")}
        feedback = {r[0] for r in con.execute("SELECT id FROM feedback")}
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    return captions, feedback, integrity


def run(args: argparse.Namespace) -> dict:
    key = "soak-" + os.urandom(8).hex()
    bads = bad_requests()
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp), args.model, key, args.threads)
        url = f"http://127.0.0.1:{server.port}"
        warm = httpx.post(url + "/v1/captions", files={"image": ("p.jpg", PHOTOS[0])}, headers={"X-API-Key": key},
                          data={"beam_size": "1"}, timeout=300)  # builds the encoder before memory is measured
        assert warm.status_code == 200, warm.text
        t0 = time.monotonic()
        samples: list[list[float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(server.proc.pid, stop, samples, t0), daemon=True)
        sampler.start()
        tally = Tally()
        threads = [threading.Thread(target=client, args=(url, key, t0 + args.seconds, args.seed + k, tally, bads))
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        time.sleep(2.0)  # requests done: what the server keeps once in-flight memory is freed
        settled = round(rss_bytes(server.proc.pid) / 2 ** 20, 1)
        health = httpx.get(url + "/healthz", timeout=30).json()
        exit_code = server.stop()
        captions, feedback, integrity = stored(server.db)
        key_logged = key in server.log.read_text(errors="replace")
    rss = [m for _, m in samples]
    quarter = max(1, len(rss) // 4)
    lat = sorted(tally.latency_ms)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 1)) if lat else (lambda q: None)
    return {
        "seconds": round(elapsed, 1), "clients": args.clients, "model": args.model, "server_threads": args.threads,
        "bad_kinds": [b.name for b in bads],
        "requests": {**tally.requests, "total": sum(tally.requests.values())},
        "status_counts": dict(sorted(tally.status.items())),
        "server_errors_5xx": len(tally.server_errors), "server_errors_sample": tally.server_errors[:5],
        "unexpected_status": len(tally.unexpected), "unexpected_sample": tally.unexpected[:5],
        "transport_errors": len(tally.transport_errors), "transport_errors_sample": tally.transport_errors[:5],
        "captions": {"acknowledged": len(tally.captions), "stored": len(captions & tally.captions),
                     "lost": len(tally.captions - captions)},
        "feedback": {"acknowledged": len(tally.feedback), "stored": len(feedback & tally.feedback),
                     "lost": len(tally.feedback - feedback)},
        "store_integrity": integrity, "server_exit_code": exit_code, "api_key_in_log": key_logged,
        "valid_latency_ms": {"p50": pct(0.5), "p99": pct(0.99),
                             "mean": round(statistics.fmean(lat), 1) if lat else None},
        "photos_captioned": health.get("images"), "model_calls": health.get("batches"),
        "rss_mb": {"start": rss[0] if rss else None, "peak": max(rss) if rss else None, "after_load": settled,
                   "growth": round(settled - rss[0], 1) if rss else None,
                   "median_first_quarter": statistics.median(rss[1:quarter + 1] or rss),
                   "median_last_quarter": statistics.median(rss[-quarter:]),
                   "trend_mb_per_min": trend(samples)},
        "rss_samples": samples[:: max(1, len(samples) // 120)],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "niceness": os.nice(0), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "note": args.note,
        "command": " ".join(["python", "benchmarks/soak.py"] + [a for a in (args.argv or []) if a != args.note
                                                                 and a != "--note"]),
    }


def passed(result: dict) -> bool:
    return (result["server_errors_5xx"] == 0 and result["feedback"]["lost"] == 0 and result["captions"]["lost"] == 0
            and result["unexpected_status"] == 0 and result["transport_errors"] == 0
            and result["store_integrity"] == "ok" and not result["api_key_in_log"])


def signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+g}"


def readme_block(result: dict) -> str:
    """The README's quote of a results file: nothing typed by hand."""
    r, m = result["requests"], result["rss_mb"]
    rows = ["| soak | value |", "|---|---|",
            f"| duration, clients | {result['seconds']:g} s, {result['clients']} concurrent clients |",
            f"| requests | {r['total']}: {r['valid']} valid caption requests, {r['bad']} bad ones "
            f"({len(result['bad_kinds'])} kinds of bad input or abuse), {r['feedback']} feedback posts |",
            f"| server errors (5xx) | **{result['server_errors_5xx']}** |",
            f"| wrong status, or connection errors | {result['unexpected_status']}, {result['transport_errors']} |",
            f"| feedback rows acknowledged / stored / lost | {result['feedback']['acknowledged']} / "
            f"{result['feedback']['stored']} / **{result['feedback']['lost']}** |",
            f"| captions acknowledged / lost | {result['captions']['acknowledged']} / {result['captions']['lost']} |",
            f"| server RSS before / peak / after the load (MB) | {m['start']} / {m['peak']} / {m['after_load']} "
            f"(growth {signed(m['growth'])}; median {m['median_first_quarter']} in the first quarter of the load, "
            f"{m['median_last_quarter']} in the last; trend {signed(m['trend_mb_per_min'])} MB/min) |",
            f"| valid request latency p50 / p99 (ms) | {result['valid_latency_ms']['p50']} / "
            f"{result['valid_latency_ms']['p99']} |",
            "",
            f"{'Passed' if passed(result) else 'FAILED'}: zero 5xx, zero lost rows, every bad request its own 4xx, "
            f"store integrity {result['store_integrity']}, API key never in the log. "
            f"{result['note'] + ' ' if result['note'] else ''}Command: `{result['command']}`; source: `benchmarks/results/soak.json`."]
    return "\n".join(rows)


def update_readme(result: dict) -> None:
    replace_block("soak", readme_block(result), README)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--model", default="default", help="checkpoint to serve (default: the shipped model)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the clients' choices")
    p.add_argument("--note", default="", help="a sentence on the machine's state, kept in the results")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "soak.json"))
    p.add_argument("--readme", action="store_true", help="also rewrite the README's quote of the results")
    p.add_argument("--readme-only", action="store_true", help="rewrite the README's quote of --out; no run")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.readme_only:
        result = json.loads(Path(args.out).read_text())
        update_readme(result)
        return result
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(readme_block(result))
    print(f"written to {out}")
    if args.readme:
        update_readme(result)
    return result


if __name__ == "__main__":
    sys.exit(0 if passed(main()) else 1)
