"""A/B experiments: config checks, sticky weighted assignment, the report's statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from captioner.service.ab import (Experiment, Variant, assign, betainc, build_report, experiment_from_dict,
                          rating_stats, resolve_checkpoint, t_cdf, t_ppf, welch_test)
from captioner.cli import main
from captioner.service.config import load_serve_config
from captioner.errors import ConfigError
from captioner.service.feedback import FeedbackStore, Served

trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


def test_t_distribution_matches_tables_and_numerical_integration():
    # two-sided 95% critical values from any t table
    for df, crit in ((1, 12.7062), (5, 2.5706), (10, 2.2281), (30, 2.0423), (1000, 1.9623)):
        assert t_ppf(0.975, df) == pytest.approx(crit, abs=1e-4)
    # the CDF against a direct integral of the density
    for df in (2.5, 7.0, 23.0):
        xs = np.linspace(-60, 1.3, 400_001)
        pdf = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + xs ** 2 / df) ** (-(df + 1) / 2)
        tail = 1 - t_cdf(60, df)  # the mass left of -60
        assert t_cdf(1.3, df) == pytest.approx(trapezoid(pdf, xs) + tail, abs=1e-5)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-4)  # 1 - sum of binomial terms
    assert t_cdf(0, 4) == 0.5


def test_welch_test_and_confidence_interval():
    a, b = [1, 2, 3, 4, 5], [2, 4, 5, 5, 5, 4]
    t, df, p = welch_test(a, b)
    assert (t, df, p) == pytest.approx((1.36756, 7.26791, 0.21224), abs=1e-4)
    s = rating_stats(a)
    assert s.mean == 3 and s.ci95 == pytest.approx((3 - 2.7764 * math.sqrt(2.5) / math.sqrt(5),
                                                     3 + 2.7764 * math.sqrt(2.5) / math.sqrt(5)), abs=1e-3)
    assert rating_stats([4]).ci95 is None and rating_stats([]).mean is None
    assert welch_test([3, 3], [3, 3])[2] == 1.0 and welch_test([3, 3], [4, 4])[2] == 0.0
    with pytest.raises(ValueError):
        welch_test([3], [4, 5])


def test_report_verdicts():
    rng = np.random.default_rng(0)
    better = build_report("e", {"a": 200, "b": 200}, {"a": list(rng.integers(1, 4, 80)),
                                                      "b": list(rng.integers(3, 6, 80))})
    assert better.comparisons[0].significant and better.verdict.startswith("b is rated higher than a")
    same = build_report("e", {"a": 50, "b": 50}, {"a": [3, 4, 3, 4, 5, 2], "b": [4, 3, 3, 4, 4, 3]})
    assert not same.comparisons[0].significant and "no significant difference" in same.verdict
    assert "not enough ratings" in build_report("e", {"a": 3, "b": 3}, {"a": [5]}).verdict


def test_assignment_is_deterministic_and_follows_the_weights():
    exp = Experiment("e1", (Variant("a", weight=3), Variant("b", weight=1), Variant("off", weight=0)))
    picks = [assign(exp, f"client-{i}").name for i in range(8000)]
    assert picks == [assign(exp, f"client-{i}").name for i in range(8000)]
    assert "off" not in picks
    assert picks.count("a") / len(picks) == pytest.approx(0.75, abs=0.02)
    # another experiment name reshuffles clients independently
    other = Experiment("e2", exp.variants)
    assert sum(assign(other, f"client-{i}").name != p for i, p in enumerate(picks)) > 1000


def test_experiment_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"variants\[1\]\.weight"):
        experiment_from_dict({"name": "x", "variants": [{"name": "a"}, {"name": "b", "weight": -1}]})
    with pytest.raises(ConfigError, match="duplicate"):
        experiment_from_dict({"variants": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"variants\[0\].*unknown field\(s\) weigth"):
        experiment_from_dict({"variants": [{"name": "a", "weigth": 2}]})
    bad = tmp_path / "s.json"
    bad.write_text('{"max_batch": 4,\n "port": }')
    with pytest.raises(ConfigError, match="line 2"):
        load_serve_config(bad)
    bad.write_text(json.dumps({"max_batch": 0}))
    with pytest.raises(ConfigError, match="max_batch"):
        load_serve_config(bad)
    toml = tmp_path / "s.toml"
    toml.write_text('port = 9000\ndb = "f.db"\n[experiment]\nname = "t"\n[[experiment.variants]]\nname = "a"\n')
    cfg = load_serve_config(toml)
    assert cfg.port == 9000 and cfg.db == str(tmp_path / "f.db") and cfg.experiment.variants[0].name == "a"


def test_checkpoints_must_stay_inside_the_model_directory(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "ok.pt").write_bytes(b"x")
    (tmp_path / "secret.pt").write_bytes(b"x")
    (models / "link.pt").symlink_to(tmp_path / "secret.pt")
    assert resolve_checkpoint(models, "ok.pt") == (models / "ok.pt").resolve()
    for name in ("../secret.pt", str(tmp_path / "secret.pt"), "link.pt", "sub/../../secret.pt"):
        with pytest.raises(ConfigError, match="outside the model directory"):
            resolve_checkpoint(models, name)
    with pytest.raises(ConfigError, match="not found"):
        resolve_checkpoint(models, "missing.pt")
    assert resolve_checkpoint(models, "default").name == "default.pt"


def served(variant: str, assigned: bool = True) -> Served:
    return Served("api", f"c-{variant}", "exp", variant, assigned, "m", "v1", "a caption", -1.0, {})


def test_ab_report_command_prints_traffic_ratings_and_verdict(tmp_path, capsys):
    db = tmp_path / "f.db"
    store = FeedbackStore(db)
    for variant, ratings in (("control", [2, 3, 2, 3, 2, 3, 3, 2]), ("candidate", [4, 5, 4, 5, 5, 4, 4, 5])):
        for r in ratings:
            store.add_feedback(store.record_caption(served(variant)), rating=r)
        store.record_caption(served(variant))  # served, never rated
    chosen = store.record_caption(served("control", assigned=False))  # picked by the client: not counted
    store.add_feedback(chosen, rating=5)
    store.close()
    assert main(["ab-report", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "candidate" in out and "control" in out
    line = next(x for x in out.splitlines() if x.startswith("control"))
    assert line.split()[1:4] == ["9", "8", "2.50"]
    assert "verdict: candidate is rated higher than control" in out
    assert main(["ab-report", "--db", str(db), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["comparisons"][0]["significant"] and rep["comparisons"][0]["p"] < 0.001
    assert main(["ab-report", "--db", str(tmp_path / "none.db")]) == 2
