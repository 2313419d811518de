"""The soak benchmark: a short run end to end (tiny model), and docs/results.md quotes its results."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, load_benchmark
from reliability import count

RESULTS = REPO / "benchmarks" / "results" / "soak.json"


def test_readme_quotes_the_soak_results():
    bench = load_benchmark("soak")
    result = json.loads(RESULTS.read_text())
    readme = (REPO / "docs" / "results.md").read_text()
    block = readme.split(bench.MARKERS[0])[1].split(bench.MARKERS[1])[0].strip()
    assert block == bench.readme_block(result), "run: python benchmarks/soak.py --readme-only"
    assert bench.passed(result) and result["seconds"] >= 30


@pytest.mark.reliability
def test_a_short_soak_passes(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from servers import tiny_checkpoint

    bench = load_benchmark("soak")
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "soak.json"
    result = bench.main(["--seconds", "3", "--clients", "3", "--model", str(model), "--out", str(out)])
    count("requests", result["requests"]["total"])
    count("inputs", result["requests"]["bad"])
    count("failures", result["server_errors_5xx"] + result["feedback"]["lost"] + result["unexpected_status"])
    assert json.loads(out.read_text()) == result
    assert bench.passed(result), {k: result[k] for k in ("server_errors_sample", "unexpected_sample",
                                                          "transport_errors_sample", "feedback")}
    assert result["requests"]["valid"] > 0 and result["requests"]["bad"] > 0 and result["feedback"]["acknowledged"] > 0
    assert result["rss_mb"]["peak"] >= result["rss_mb"]["start"] > 0 and result["rss_mb"]["after_load"] > 0
