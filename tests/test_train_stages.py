"""benchmarks/train_stages.py: refuses a missing dataset before any work, naming it."""
from __future__ import annotations

from conftest import refuses_before_work


def test_train_stages_names_a_missing_dataset(tmp_path, capsys):
    missing, out = tmp_path / "nowhere", tmp_path / "out.json"
    refuses_before_work("train_stages", ["--data", str(missing), "--out", str(out)],
                        f"--data {missing}: no such folder", out, capsys)
