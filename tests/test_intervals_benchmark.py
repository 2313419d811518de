"""benchmarks/intervals.py: paired bootstrap intervals for named pairs of captions files."""
import json

import pytest
from test_compare import _split, _write

from conftest import REPO, load_benchmark

bench = load_benchmark("intervals")


def test_writes_each_pair_and_the_readme_block(tmp_path):
    refs, weak, strong = _split()
    a, b = _write(tmp_path / "a.json", refs, weak), _write(tmp_path / "b.json", refs, strong)
    out = tmp_path / "intervals.json"
    result = bench.main(["--pair", "weak → strong", "test", str(a), str(b), "--pair", "same", "dev", str(a), str(a),
                         "--resamples", "200", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # intervals: tuples there, lists here
    assert [p["label"] for p in result["pairs"]] == ["weak → strong", "same"]
    strong_cider = next(m for m in result["pairs"][0]["metrics"] if m["metric"] == "CIDEr")
    assert strong_cider["diff_interval"][0] > 0 and strong_cider["b_better"] == 1.0
    block = bench.readme_block(result, "x.json").splitlines()
    rows = [r for r in block if r.startswith("| weak") or r.startswith("| same")]
    assert len(rows) == 4  # BLEU-4 and CIDEr-D for each pair
    assert "| same | dev | CIDEr-D |" in block[5] and "| +0.000 | [+0.000, +0.000] | 0% of draws |" in block[5]
    assert "200 draws (seed 0)" in block[-1] and "source: `x.json`" in block[-1]


def test_needs_a_pair_and_refuses_a_readme_without_the_block_first(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main([])
    assert "at least one --pair" in capsys.readouterr().err
    monkeypatch.setattr(bench, "missing_block", lambda name: f"README.md has no <!-- {name}:start --> block")
    with pytest.raises(SystemExit):  # not the missing file's error: nothing was read yet
        bench.main(["--pair", "x", "test", str(tmp_path / "none.json"), str(tmp_path / "none.json"), "--readme"])
    assert "README.md has no <!-- intervals:start --> block" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a block of its own is checked by its own name
        bench.main(["--pair", "x", "test", str(tmp_path / "none.json"), str(tmp_path / "none.json"), "--readme",
                    "--block", "intervals-default"])
    assert "README.md has no <!-- intervals-default:start --> block" in capsys.readouterr().err


@pytest.mark.parametrize("name, source", [("intervals", "benchmarks/results/intervals.json"),
                                          ("intervals-default", "benchmarks/results/intervals-default.json")])
def test_readme_quotes_the_results_file(name, source):
    result = json.loads((REPO / source).read_text())
    readme = (REPO / "README.md").read_text()
    block = readme.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
    assert block.strip() == bench.readme_block(result, source).strip(), \
        f"run: python benchmarks/intervals.py --out {source} --block {name} --readme-only"


def test_scst_gain_keeps_both_ends_captions_for_compare(tiny_data, tmp_path):
    gain = load_benchmark("scst_gain")
    default = str(REPO / "src/captioner/weights/default.pt")
    caps = tmp_path / "caps"
    result = gain.main(["--xe", default, "--scst", default, "--data", str(tiny_data), "--beam-size", "2",
                        "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "gain.json"),
                        "--captions-dir", str(caps)])
    assert sorted(p.name for p in caps.iterdir()) == ["captions-test-scst.json", "captions-test-xe.json"]
    assert len(json.loads((caps / "captions-test-xe.json").read_text())) == 6
    assert result["gain"]["CIDEr"] == 0  # the same model at both ends


def test_the_script_refuses_to_start_without_the_mirror_views_captions(tmp_path):
    import subprocess

    done = subprocess.run(["bash", str(REPO / "benchmarks" / "intervals.sh")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert "runs/mirror_views/captions-dev-off.json missing: run benchmarks/mirror_views.py first" in done.stderr
    assert not (tmp_path / "runs" / "intervals").exists()  # nothing scored before the check
