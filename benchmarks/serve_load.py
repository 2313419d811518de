"""Load test of `captioner serve`: throughput and latency with micro-batching on and off.

    nice -n 19 python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--rounds 2]
                                               [--out benchmarks/results/serve_load.json]

Starts the server on 127.0.0.1 (a free port) once with micro-batching (max_batch 16) and once
serving one photo at a time (max_batch 1), same model, same torch threads, and runs N client
threads against each for a bounded time and a bounded number of requests: each client posts
the example photos in turn (multipart upload, beam 3) and waits for the answer. Rounds
alternate the two modes, so drift in the machine's load hits both. Reports requests, failures,
throughput and p50/p99 latency per mode, and the throughput ratio.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "examples").glob("*.jpg"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(photo: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
                 f'Content-Type: image/jpeg\r\n\r\n'.encode() + photo + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Server:
    """`captioner serve` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, max_batch: int, threads: int, workdir: Path):
        self.port = free_port()
        cfg = workdir / f"serve-{max_batch}.json"
        cfg.write_text(json.dumps({"max_batch": max_batch, "max_wait_ms": 10, "threads": threads,
                                   "db": f"load-{max_batch}.db"}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("CAPTIONER_API_KEYS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--config", str(cfg),
                                      "--host", "127.0.0.1", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if self.get("/healthz")["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not start within 120 s")

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def client(port: int, bodies: list[tuple[bytes, str]], stop_at: float, max_requests: int, offset: int,
           latencies: list[float], failures: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(max_requests):
        if time.perf_counter() >= stop_at:
            break
        body, ctype = bodies[(offset + i) % len(bodies)]
        t = time.perf_counter()
        try:
            conn.request("POST", "/v1/captions", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200 or not json.loads(data).get("caption"):
                failures.append(f"HTTP {resp.status}: {data[:200]!r}")
            else:
                latencies.append(time.perf_counter() - t)
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"{type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.close()


def load(port: int, clients: int, seconds: float, max_requests: int) -> dict:
    bodies = [multipart(p.read_bytes(), {"beam_size": "3", "max_len": "25"}) for p in PHOTOS]
    latencies: list[float] = []
    failures: list[str] = []
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(port, bodies, start + seconds, max_requests, k, latencies,
                                                      failures)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # includes the requests in flight at the deadline
    ms = sorted(x * 1000 for x in latencies)
    pct = (lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]) if ms else (lambda q: float("nan"))
    return {"requests": len(latencies) + len(failures), "ok": len(latencies), "failed": len(failures),
            "failures_sample": failures[:3], "seconds": round(elapsed, 2),
            "throughput_rps": round(len(latencies) / elapsed, 2),
            "latency_ms": {"p50": round(pct(0.50), 1), "p99": round(pct(0.99), 1),
                           "mean": round(statistics.fmean(ms), 1) if ms else None}}


def run_mode(max_batch: int, args: argparse.Namespace, workdir: Path) -> dict:
    server = Server(max_batch, args.threads, workdir)
    try:
        load(server.port, args.clients, min(3.0, args.seconds), 8)  # warm-up: encoder, allocator, caches
        before = server.get("/healthz")
        result = load(server.port, args.clients, args.seconds, args.max_requests)
        after = server.get("/healthz")
        batches = after["batches"] - before["batches"]
        result["model_calls"] = batches
        result["mean_batch"] = round((after["images"] - before["images"]) / max(batches, 1), 2)
        result["largest_batch"] = after["largest_batch"]
        return result
    finally:
        server.stop()


def summarise(runs: list[dict]) -> dict:
    ok, secs = sum(r["ok"] for r in runs), sum(r["seconds"] for r in runs)
    return {"throughput_rps": round(ok / secs, 2), "requests": sum(r["requests"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
            "latency_ms_p50": round(statistics.median(r["latency_ms"]["p50"] for r in runs), 1),
            "latency_ms_p99": round(max(r["latency_ms"]["p99"] for r in runs), 1),
            "mean_batch": round(statistics.fmean(r["mean_batch"] for r in runs), 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=20.0, help="load time per mode and round (default 20)")
    p.add_argument("--max-requests", type=int, default=2000, help="per client per round, an upper bound")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both modes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    modes = {"batched": 16, "one_at_a_time": 1}
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode, max_batch in modes.items():
                res = run_mode(max_batch, args, Path(tmp))
                rounds[mode].append(res)
                print(f"round {r + 1} {mode:14s} {res['throughput_rps']:6.2f} req/s  p50 {res['latency_ms']['p50']:7.1f} ms  "
                      f"p99 {res['latency_ms']['p99']:7.1f} ms  failed {res['failed']}  mean batch {res['mean_batch']}",
                      flush=True)
    summary = {m: summarise(rs) for m, rs in rounds.items()}
    ratio = summary["batched"]["throughput_rps"] / max(summary["one_at_a_time"]["throughput_rps"], 1e-9)
    result = {
        "clients": args.clients, "seconds_per_round": args.seconds, "rounds": args.rounds,
        "server_threads": args.threads, "request": "multipart upload of an example photo, beam 3, max_len 25",
        "summary": summary, "throughput_ratio": round(ratio, 2),
        "bar_2x_met": bool(ratio >= 2.0 and summary["batched"]["failed"] == 0
                           and summary["one_at_a_time"]["failed"] == 0),
        "runs": rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"throughput ratio batched / one at a time: {ratio:.2f}x; written to {out}")
    return result


if __name__ == "__main__":
    main()
