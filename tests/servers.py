"""Helpers for tests that talk to a real server on 127.0.0.1: a free port, uvicorn in a
thread, `captioner serve` in a child process, and a tiny random model to serve quickly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from conftest import TINY_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny random soft-attention model (real encoder config): captions are nonsense but
    every code path of serving runs, fast."""
    from captioner.models.checkpoint import save_checkpoint
    from captioner.models.model import CaptionModel, ModelConfig
    from captioner.data.vocab import Vocab

    torch.manual_seed(seed)
    vocab = Vocab.build(["a red square on a table", "a blue circle near a dog", "two people walk"], min_count=1)
    save_checkpoint(path, CaptionModel(ModelConfig.from_dict(TINY_MODEL), vocab).eval())
    return path


class Running:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app, **uvicorn_options):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **uvicorn_options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Subprocess:
    """`captioner serve --config FILE` in a child process (its own process group), output to
    a log file; `kill()` sends SIGKILL, as a crash or the OOM killer would."""

    def __init__(self, config: Path, log: Path, env: dict | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "captioner.cli", "serve", "--config", str(config),
                                          "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.wait_up()

    def wait_up(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError("server did not come up")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def write_config(path: Path, **fields) -> Path:
    path.write_text(json.dumps(fields, indent=1))
    return path


def tiny_app(tmp: Path, key: str, **fields):
    """A server app (not started) over one tiny random model in `tmp`, guarded by API key `key`,
    at most 4 photos per request; `fields` override the config's."""
    from captioner.service.config import load_serve_config
    from captioner.service.serve import create_app

    (tmp / "models").mkdir(exist_ok=True)
    if not (tmp / "models" / "tiny.pt").exists():
        tiny_checkpoint(tmp / "models" / "tiny.pt")
    fields = {"model_dir": "models", "db": "feedback.db", "api_keys": [key], "max_images": 4,
              "experiment": {"name": "rel", "variants": [{"name": "tiny", "checkpoint": "tiny.pt"}]}, **fields}
    return create_app(load_serve_config(write_config(tmp / "serve.json", **fields)))
