"""benchmarks/stage_minutes.py: a retrain's minutes by stage and CPU, from a run's kept files."""
import json

import pytest

from conftest import REPO, load_benchmark

bench = load_benchmark("stage_minutes")


def _run(folder, xe_seconds, scst_seconds, extra_trajectories=()):
    folder.mkdir()
    (folder / "timing.json").write_text(json.dumps({"prepare_minutes": 2.0, "retrain_minutes": 9.9}))
    epochs = [{"phase": "xe", "train_seconds": s, "val_seconds": 0} for s in xe_seconds]
    epochs += [{"phase": "scst", "train_seconds": s, "val_seconds": 30} for s in scst_seconds]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in epochs) + "\n")
    for k, seconds in enumerate(extra_trajectories, start=2):
        (folder / f"scst-{k}").mkdir()
        (folder / f"scst-{k}" / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"phase": "scst", "train_seconds": s, "val_seconds": 30}) for s in seconds))
    return folder


def test_each_stage_and_trajectory_from_the_logs_and_the_cpu_named(tmp_path):
    run = _run(tmp_path / "soup", [60, 120], [90, 90], extra_trajectories=[[150], [30, 30]])
    (run / "lscpu.txt").write_text("Model name:  AMD EPYC\nCPU family:   25\nModel:  17\n")
    row = bench.stages(run)
    assert row == {"run": "soup", "cpu": "AMD EPYC (family 25, model 17)", "prepare": 2.0, "xe": 3.0,
                   "scst": [4.0, 3.0, 2.0], "retrain": 9.9}
    assert "| soup | AMD EPYC (family 25, model 17) | 2.0 | 3.0 | 4.0 + 3.0 + 2.0 | **9.9** |" in bench.block([row])
    assert bench.stages(_run(tmp_path / "plain", [60], []))["cpu"] == "unknown CPU"


def test_a_folder_without_its_files_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "empty")])
    assert f"{tmp_path / 'empty' / 'timing.json'}: missing" in capsys.readouterr().err


def test_readme_quotes_the_kept_runs():
    readme = (REPO / "README.md").read_text()
    shown = readme.split("<!-- stage-minutes:start -->")[1].split("<!-- stage-minutes:end -->")[0]
    rows = [bench.stages(REPO / "benchmarks" / "results" / name) for name in ("default", "refit-one-trajectory")]
    assert shown.strip() == bench.block(rows).strip(), "run: python benchmarks/stage_minutes.py --readme"
