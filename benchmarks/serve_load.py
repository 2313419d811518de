"""Load test of `captioner serve`: throughput and latency with micro-batching on and off.

    nice -n 19 python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--rounds 2]
                                               [--workers 2,1] [--threads 1,2]
                                               [--model PATH] [--out benchmarks/results/serve_load.json] [--readme]

Starts the server on 127.0.0.1 (a free port) once with micro-batching (max_batch 16) and once
serving one photo at a time (max_batch 1), same model, at each setting of model workers and
torch threads per worker (`--workers` x `--threads`), and runs N client threads against each for
a bounded time and a bounded number of requests: each client posts the example photos in turn
(multipart upload, beam 3) and waits for the answer. Rounds alternate the modes and settings, so
drift in the machine's load hits all. The bars are judged at serve's defaults (`ServeConfig`:
2 workers of 1 thread); the other settings are shown beside them. Reports requests, failures,
throughput and p50/p99 latency per mode, and the throughput ratio, with where the time went
per photo (from the server's /healthz counters): the model's (`model_ms_per_photo`), split into
its encoder passes and searches (`encode_ms_per_photo`, `search_ms_per_photo`), and the request
threads' photo decoding (`decode_ms_per_photo`), which runs beside the model on the same cores.
Before each server starts and after the last one stops, one forward pass of the stock
EfficientNet-Lite0 with one torch thread is timed in this process (no server running; the median
of 20 after 3 warm-up passes, and the run's yardstick is the median of all of them, as the shared
machine's speed drifts within minutes): throughput is also given in photos per that time (`photos_per_lite0_forward`; issue 36's bar: >= 1.0, batching >= 1.0x one at a time).
The server serves the shipped default model, or `--model PATH` (any exported checkpoint) as its
one variant.
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


from captioner.files import atomic_write_text
from captioner.service.config import ServeConfig
from latency import cpu_info
from results_blocks import markers, replace_block

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


def serve_settings(max_batch: int, threads: int, max_wait_ms: float, encode_chunk: int,
                   model: Path | None = None, workers: int = 2) -> dict:
    """The server's config file: the shipped default model, or `model` as its one variant."""
    settings = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "threads": threads, "model_workers": workers,
                "encode_chunk": encode_chunk, "db": f"load-{max_batch}.db"}
    if model is not None:  # that file, from its own folder
        model = Path(model).resolve()
        settings.update(model_dir=str(model.parent),
                        experiment={"name": "load", "variants": [{"name": "default", "checkpoint": model.name}]})
    return settings


class Server:
    """`captioner serve` in a child process on 127.0.0.1, stopped on exit."""

    def __init__(self, max_batch: int, threads: int, workdir: Path, max_wait_ms: float = 10, encode_chunk: int = 4,
                 model: Path | None = None, workers: int = 2):
        self.port = free_port()
        cfg = workdir / f"serve-{max_batch}.json"
        cfg.write_text(json.dumps(serve_settings(max_batch, threads, max_wait_ms, encode_chunk, model, workers)))
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


class Connection:
    """A minimal keep-alive HTTP/1.1 client on a raw socket: the load generator shares the
    server's CPUs, so it should cost as little as possible per request."""

    def __init__(self, port: int):
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
            self.buf = b""
        self.sock.sendall(raw)
        while b"\r\n\r\n" not in self.buf:
            self._read()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length")
        while len(self.buf) < length:
            self._read()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def raw_request(port: int, body: bytes, ctype: str) -> bytes:
    return (f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def client(port: int, requests: list[bytes], stop_at: float, max_requests: int, offset: int,
           latencies: list[float], failures: list[str]) -> None:
    conn = Connection(port)
    for i in range(max_requests):
        if time.perf_counter() >= stop_at:
            break
        t = time.perf_counter()
        try:
            status, data = conn.request(requests[(offset + i) % len(requests)])
            if status != 200 or not json.loads(data).get("caption"):
                failures.append(f"HTTP {status}: {data[:200]!r}")
            else:
                latencies.append(time.perf_counter() - t)
        except (OSError, ValueError, StopIteration) as e:
            failures.append(f"{type(e).__name__}: {e}")
            conn.close()
    conn.close()


def load(port: int, clients: int, seconds: float, max_requests: int) -> dict:
    bodies = [raw_request(port, *multipart(p.read_bytes(), {"beam_size": "3", "max_len": "25"})) for p in PHOTOS]
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


def run_mode(max_batch: int, threads: int, args: argparse.Namespace, workdir: Path, encode_chunk: int = 4,
             workers: int = 2) -> dict:
    server = Server(max_batch, threads, workdir, args.max_wait_ms, encode_chunk, args.model, workers)
    try:
        load(server.port, args.clients, min(3.0, args.seconds), 8)  # warm-up: encoder, allocator, caches
        before = server.get("/healthz")
        result = load(server.port, args.clients, args.seconds, args.max_requests)
        after = server.get("/healthz")
        batches = after["batches"] - before["batches"]
        result["model_calls"] = batches
        result["mean_batch"] = round((after["images"] - before["images"]) / max(batches, 1), 2)
        result["largest_batch"] = after["largest_batch"]
        # the model workers' busy time over the load time: near their number means the model is
        # the bottleneck
        result["model_busy_fraction"] = round((after["model_busy_s"] - before["model_busy_s"]) / result["seconds"], 3)
        result["model_ms_per_photo"] = round(1000 * (after["model_busy_s"] - before["model_busy_s"])
                                             / max(after["images"] - before["images"], 1), 1)
        # the model's time split into encoder passes and searches, and the request threads' photo
        # decoding (which runs beside the model on the same cores)
        photos = max(after["images"] - before["images"], 1)
        for stage in STAGES[1:3]:
            result[f"{stage}_ms_per_photo"] = round(1000 * (after[f"{stage}_s"] - before[f"{stage}_s"]) / photos, 1)
        result["decode_ms_per_photo"] = round(1000 * (after["decode_s"] - before["decode_s"])
                                              / max(after["photos_decoded"] - before["photos_decoded"], 1), 1)
        return result
    finally:
        server.stop()


def stock_forward_ms(repeats: int = 20, warmup: int = 3) -> float:
    """Median time of one forward pass of the stock EfficientNet-Lite0 (ImageNet classifier,
    eager, channels-last) on one example photo with one torch thread, in this process: the
    yardstick of the throughput bar (photos per single-thread Lite0 forward time). Measured
    between load rounds, while no server runs, so it sees the same machine in the same run."""
    import torch

    from captioner.models.encoders import get_encoder_config, preprocess, pretrained_backbone

    cfg = get_encoder_config("efficientnet-lite0")
    net = pretrained_backbone(cfg).eval().to(memory_format=torch.channels_last)
    x = preprocess(PHOTOS[0], cfg)[None].contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(warmup):
                net(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                net(x)
                times.append((time.perf_counter() - t) * 1000)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


STAGES = ("model", "encode", "search", "decode")  # the model's time, its two parts, and the request threads'


def summarise(runs: list[dict]) -> dict:
    ok, secs = sum(r["ok"] for r in runs), sum(r["seconds"] for r in runs)
    summary = {"throughput_rps": round(ok / secs, 2), "requests": sum(r["requests"] for r in runs),
               "failed": sum(r["failed"] for r in runs),
               "latency_ms_p50": round(statistics.median(r["latency_ms"]["p50"] for r in runs), 1),
               "latency_ms_p99": round(max(r["latency_ms"]["p99"] for r in runs), 1),
               "mean_batch": round(statistics.fmean(r["mean_batch"] for r in runs), 2)}
    for stage in STAGES:  # where the time went, per photo (the mean over the rounds)
        summary[f"{stage}_ms_per_photo"] = round(statistics.fmean(r[f"{stage}_ms_per_photo"] for r in runs), 1)
    return summary


README = REPO / "docs" / "results.md"  # where the generated blocks live
MARKERS = markers("serve-load")


def readme_block(result: dict, source: str = "benchmarks/results/serve_load.json") -> str:
    """The README's quote of a results file: a table of its summary, nothing typed by hand."""
    rows = ["| serving | model workers x torch threads | throughput (req/s) | photos per Lite0 forward | p50 latency (ms) | "
            "p99 latency (ms) | failed / requests | photos per model call |",
            "|---|---|---|---|---|---|---|---|"]
    if "by_setting" not in result:
        raise SystemExit("the results file predates the model-workers sweep (no by_setting): rerun the benchmark")
    default = result["default_setting"]
    for key, m in result["by_setting"].items():
        mode, setting = key.split("@")
        label = ("one photo at a time" if mode == "one_at_a_time" else
                 "micro-batched (max 16 photos, 10 ms wait" + (f", encode chunk {m['encode_chunk']})"
                                                               if mode != "batched" else ")"))
        if mode == "one_at_a_time" and setting != default:
            continue
        star = " (serve's default)" if setting == default else ""
        rows.append(f"| {label} | {setting}{star} | {m['throughput_rps']} | {m['photos_per_lite0_forward']} | "
                    f"{m['latency_ms_p50']} | {m['latency_ms_p99']} | {m['failed']} / {m['requests']} | {m['mean_batch']} |")
    rows.append("")
    per_forward = result.get("photos_per_lite0_forward")
    isa = ", kernels held to AVX2" if (result.get("cpu") or {}).get("isa_env", {}).get("ONEDNN_MAX_CPU_ISA") else ""
    rows.append(f"{result['clients']} concurrent clients, {result['rounds']} alternating rounds of "
                f"{result['seconds_per_round']:g} s per mode and setting{isa}; at serve's defaults, batching over "
                f"one at a time **{result['throughput_ratio']}x** (bar: >= 1.0x)"
                + (f"; {per_forward} photos per single-thread stock Lite0 forward "
                   f"({result['stock_lite0_forward_ms_one_thread']} ms; bar: >= 1.0)" if per_forward is not None else "")
                + f". Source: `{source}`.")
    return "\n".join(rows)


def update_readme(result: dict, out: str | Path) -> None:
    """Rewrite docs/results.md's serve-load block from a results file."""
    out = Path(out).resolve()
    source = str(out.relative_to(REPO)) if out.is_relative_to(REPO) else str(out)
    replace_block("serve-load", readme_block(result, source), README)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=20.0, help="load time per mode and round (default 20)")
    p.add_argument("--max-requests", type=int, default=2000, help="per client per round, an upper bound")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both modes (default 2)")
    p.add_argument("--workers", default="2,1",
                   help="model workers in the server; with a list, each mode runs at each (default 2,1)")
    p.add_argument("--threads", default="1,2",
                   help="torch threads per model worker; with a list, each mode runs at each (default 1,2)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="batching: the first photo's longest wait")
    p.add_argument("--encode-chunk", default="4",
                   help="photos per encoder call within a batch; with a list (e.g. 1,4) batching runs at each, "
                        "compared at its best (default 4)")
    p.add_argument("--model", type=Path, help="serve this checkpoint instead of the shipped default model")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    p.add_argument("--readme", action="store_true", help="also rewrite the README's quote of the results")
    p.add_argument("--readme-only", action="store_true", help="rewrite the README's quote of --out; no load run")
    args = p.parse_args(argv)
    if args.model is not None and not args.model.is_file():  # before any server starts
        p.error(f"--model {args.model}: no such checkpoint file")
    if args.readme_only:
        result = json.loads(Path(args.out).read_text())
        update_readme(result, args.out)
        return result
    chunks = [int(c) for c in str(args.encode_chunk).split(",")]
    # batching at each encode chunk; one photo at a time has nothing to chunk
    modes = {**{("batched" if len(chunks) == 1 else f"batched-chunk{c}"): (16, c) for c in chunks},
             "one_at_a_time": (1, chunks[0])}
    defaults = ServeConfig()
    default = f"{defaults.model_workers}x{defaults.threads}"
    settings = [(w, t) for w in (int(x) for x in str(args.workers).split(","))
                for t in (int(x) for x in str(args.threads).split(","))]
    if (defaults.model_workers, defaults.threads) not in settings:  # the bars are judged there
        settings.insert(0, (defaults.model_workers, defaults.threads))
    rounds: dict[tuple[str, str], list[dict]] = {(m, f"{w}x{t}"): [] for m in modes for w, t in settings}
    forward_ms: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for (mode, setting) in rounds:
                forward_ms.append(stock_forward_ms())
                workers, threads = map(int, setting.split("x"))
                res = run_mode(modes[mode][0], threads, args, Path(tmp), modes[mode][1], workers)
                rounds[mode, setting].append(res)
                print(f"round {r + 1} {mode:14s} {setting} {res['throughput_rps']:6.2f} req/s  p50 {res['latency_ms']['p50']:7.1f} ms  "
                      f"p99 {res['latency_ms']['p99']:7.1f} ms  failed {res['failed']}  mean batch {res['mean_batch']}  "
                      f"model busy {res['model_busy_fraction']:.2f} ({res['model_ms_per_photo']} ms/photo)",
                      flush=True)
    forward_ms.append(stock_forward_ms())
    lite0_ms = statistics.median(forward_ms)
    by_setting = {}
    for (m, setting), rs in rounds.items():
        workers, threads = map(int, setting.split("x"))
        v = {**summarise(rs), "model_workers": workers, "server_threads": threads, "encode_chunk": modes[m][1]}
        v["photos_per_lite0_forward"] = round(v["throughput_rps"] * lite0_ms / 1000, 2)  # per single-thread forward time
        by_setting[f"{m}@{setting}"] = v
    # the bars: serve's defaults; batching at its best encode chunk
    batched = [m for m in modes if m.startswith("batched")]
    summary = {"batched": max((by_setting[f"{m}@{default}"] for m in batched), key=lambda v: v["throughput_rps"]),
               "one_at_a_time": by_setting[f"one_at_a_time@{default}"]}
    ratio = summary["batched"]["throughput_rps"] / max(summary["one_at_a_time"]["throughput_rps"], 1e-9)
    result = {
        "model": str(args.model) if args.model else "default",
        "clients": args.clients, "seconds_per_round": args.seconds, "rounds": args.rounds,
        "settings": [f"{w}x{t}" for w, t in settings], "default_setting": default, "by_setting": by_setting,
        "max_wait_ms": args.max_wait_ms, "encode_chunk": chunks,
        "request": "multipart upload of an example photo, beam 3, max_len 25",
        "summary": summary, "throughput_ratio": round(ratio, 2),
        "stock_lite0_forward_ms_one_thread": round(lite0_ms, 2), "stock_lite0_forward_ms_each": [round(t, 2) for t in forward_ms],
        "photos_per_lite0_forward": summary["batched"]["photos_per_lite0_forward"],
        "bar_lite0_met": bool(summary["batched"]["photos_per_lite0_forward"] >= 1.0 and ratio >= 1.0
                              and summary["batched"]["failed"] == 0),
        "runs": {f"{m}@{setting}": rs for (m, setting), rs in rounds.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg())},
        "cpu": cpu_info(),  # the ISA flags and the kernel caps in the environment (the server inherits them)
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"throughput ratio batched / one at a time: {ratio:.2f}x; written to {out}")
    if args.readme:
        update_readme(result, args.out)
    return result


if __name__ == "__main__":
    main()
