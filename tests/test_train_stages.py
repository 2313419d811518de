"""benchmarks/train_stages.py: refuses a missing dataset before any work, naming it."""
from __future__ import annotations

import pytest

from conftest import load_benchmark


def test_train_stages_names_a_missing_dataset(tmp_path, capsys):
    bench = load_benchmark("train_stages")
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        bench.main(["--data", str(missing), "--out", str(tmp_path / "out.json")])
    assert f"--data {missing}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
