"""benchmarks/train_stages.py and train_step_probes.py: refuse a missing dataset before any work, naming it."""
from __future__ import annotations

from conftest import refuses_before_work


def test_train_stages_names_a_missing_dataset(tmp_path, capsys):
    missing, out = tmp_path / "nowhere", tmp_path / "out.json"
    refuses_before_work("train_stages", ["--data", str(missing), "--out", str(out)],
                        f"--data {missing}: no such folder", out, capsys)


def test_train_step_probes_names_a_missing_dataset(tmp_path, capsys):
    missing, out = tmp_path / "nowhere", tmp_path / "out.json"
    refuses_before_work("train_step_probes", ["--data", str(missing), "--out", str(out)],
                        f"--data {missing}: no such folder", out, capsys)
