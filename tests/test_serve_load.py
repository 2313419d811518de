"""docs/results.md quotes the load benchmark's results file; the micro-batcher's own contract."""
from __future__ import annotations

import json
import threading
import time

import pytest

from conftest import REPO, load_benchmark, refuses_before_work

def test_readme_quotes_the_results_file():
    """The block names its source file and is exactly what the script writes from it."""
    bench = load_benchmark("serve_load")
    readme = (REPO / "docs" / "results.md").read_text()
    block = readme.split(bench.MARKERS[0])[1].split(bench.MARKERS[1])[0].strip()
    source = block.rsplit("Source: `", 1)[1].split("`", 1)[0]
    result = json.loads((REPO / source).read_text())
    assert block == bench.readme_block(result, source), "run: python benchmarks/serve_load.py --readme-only --out FILE"
    assert result["summary"]["batched"]["requests"] > 0 and result["clients"] == 16


def test_micro_batcher_groups_bounds_and_routes_results():
    pytest.importorskip("fastapi")
    import torch

    from captioner.service.serve import Job, MicroBatcher

    seen: list[list[tuple[str, int]]] = []

    def run(jobs):
        seen.append([(j.variant, int(j.pixels[0])) for j in jobs])
        time.sleep(0.02)  # a slow model: more jobs queue up meanwhile
        for j in jobs:
            j.future.set_result(f"{j.variant}:{int(j.pixels[0])}")

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05)
    batcher.start()
    jobs = [Job("a" if i % 2 else "b", (3, 25, 1), torch.tensor([i])) for i in range(11)]
    threads = [threading.Thread(target=batcher.submit, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    results = [j.future.result(timeout=10) for j in jobs]
    batcher.stop()
    assert results == [f"{'a' if i % 2 else 'b'}:{i}" for i in range(11)]  # each job gets its own answer
    assert max(len(b) for b in seen) <= 4 and len(seen) < 11 and sum(len(b) for b in seen) == 11
    assert batcher.images == 11 and batcher.largest == max(len(b) for b in seen)


def test_micro_batcher_passes_model_errors_to_every_waiting_client():
    pytest.importorskip("fastapi")
    import torch

    from captioner.service.serve import Job, MicroBatcher

    def run(jobs):
        raise RuntimeError("model exploded")

    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.01)
    batcher.start()
    jobs = [batcher.submit(Job("a", (1, 5, 1), torch.zeros(1))) for _ in range(3)]
    for f in jobs:
        with pytest.raises(RuntimeError, match="exploded"):
            f.result(timeout=10)
    batcher.stop()


def test_micro_batcher_workers_run_batches_at_once_and_stop_together():
    """Two workers: a second batch starts while the first is still running (a barrier both must
    reach), every job gets its own answer, the busy time counts both, and stop() ends both."""
    pytest.importorskip("fastapi")
    import torch

    from captioner.service.serve import Job, MicroBatcher

    both_running = threading.Barrier(2, timeout=10)
    overlapped = []

    def run(jobs):
        if not overlapped:
            both_running.wait()  # raises BrokenBarrierError unless another batch runs meanwhile
            overlapped.append(True)
        time.sleep(0.02)
        for j in jobs:
            j.future.set_result(int(j.pixels[0]))

    batcher = MicroBatcher(run, max_batch=2, max_wait_s=0.0, workers=2)
    batcher.start()
    jobs = [Job("a", (3, 25, 1, True), torch.tensor([i])) for i in range(8)]
    for j in jobs:
        batcher.submit(j)
    assert [j.future.result(timeout=10) for j in jobs] == list(range(8))
    assert overlapped and batcher.images == 8 and batcher.batches >= 4
    assert batcher.busy() > 0
    threads = list(batcher._threads)
    batcher.stop()
    assert threads and not any(t.is_alive() for t in threads)


def test_micro_batcher_runs_again_after_a_stop():
    """stop() leaves no stop signal behind: a restarted batcher (an app's lifespan run twice)
    answers jobs, and /healthz's queue count is not inflated."""
    pytest.importorskip("fastapi")
    import torch

    from captioner.service.serve import Job, MicroBatcher

    def run(jobs):
        for j in jobs:
            j.future.set_result(int(j.pixels[0]))

    for workers in (1, 2):
        batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.0, workers=workers)
        batcher.start()
        batcher.stop()
        assert batcher.pending() == 0
        batcher.start()
        assert batcher.submit(Job("a", (3, 25, 1, True), torch.tensor([7]))).result(timeout=10) == 7
        batcher.stop()


def test_load_benchmark_refuses_an_old_results_file(tmp_path):
    bench = load_benchmark("serve_load")
    with pytest.raises(SystemExit, match="predates"):
        bench.readme_block({"summary": {}}, "old.json")


def test_load_benchmark_serves_the_model_it_is_given(tmp_path):
    """`serve_load.py --model PATH`: the server's config names that file as its one variant."""
    from captioner.service.ab import resolve_checkpoint
    from captioner.service.config import load_serve_config

    bench = load_benchmark("serve_load")
    model = tmp_path / "models" / "mine.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    for given, expected in ((model, model.resolve()), (None, "default")):
        cfg_file = tmp_path / "serve.json"
        cfg_file.write_text(json.dumps(bench.serve_settings(16, 2, 10.0, 4, given)))
        cfg = load_serve_config(cfg_file)
        [variant] = cfg.experiment.variants
        if given is None:
            assert variant.checkpoint == expected
        else:
            assert resolve_checkpoint(cfg.model_dir, variant.checkpoint) == expected


def test_load_benchmark_names_a_missing_model_before_starting_a_server(tmp_path, capsys):
    missing, out = tmp_path / "gone.pt", tmp_path / "out.json"
    refuses_before_work("serve_load", ["--model", str(missing), "--out", str(out)],
                        f"--model {missing}: no such checkpoint file", out, capsys)
