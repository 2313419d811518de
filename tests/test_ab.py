"""A/B experiments: config checks, sticky weighted assignment, the report's statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from captioner.service.ab import (Experiment, Variant, assign, betainc, build_report, experiment_from_dict,
                                  live_experiment, rating_stats, resolve_checkpoint, sticky_assign, t_cdf, t_ppf,
                                  welch_test)
from captioner.cli import main
from captioner.service.config import load_serve_config
from captioner.errors import ConfigError
from captioner.service.feedback import ExperimentState, ExperimentStateError, FeedbackError, FeedbackStore, Served

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


def test_ab_report_command_prints_traffic_ratings_and_verdict(store_db, tmp_path, capsys):
    db = store_db
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


def test_ab_report_refuses_a_meaningless_alpha_and_an_unknown_experiment(store_db, capsys):
    store = FeedbackStore(store_db)
    for variant in ("control", "candidate"):
        store.record_caption(served(variant))
    store.record_caption(Served("api", "c", "other", "v", True, "m", "v1", "a caption", -1.0, {}))
    store.close()
    # p < alpha / pairs: 0 finds nothing, NaN compares false with every p, 0.5 and up nearly anything
    for alpha in ("0", "-0.05", "nan", "0.51", "5", "inf"):
        assert main(["ab-report", "--db", store_db, "--alpha", alpha]) == 2
        err = capsys.readouterr().err
        assert "--alpha must be above 0 and at most 0.5" in err, (alpha, err)
    assert main(["ab-report", "--db", store_db, "--alpha", "0.5"]) == 0
    capsys.readouterr()
    assert main(["ab-report", "--db", store_db, "--experiment", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no empty table, no "only one variant has traffic"
    assert "--experiment 'nope': no such experiment in" in captured.err and "it has 'exp', 'other'" in captured.err
    assert main(["ab-report", "--db", store_db, "--experiment", "exp"]) == 0
    assert "experiment exp" in capsys.readouterr().out


# --- sticky assignments in the store, promotion and retirement ----------------------------------

def test_sticky_assignments_survive_a_promotion_until_their_variant_is_retired(store_db):
    exp = Experiment("e", (Variant("control"), Variant("candidate")))
    store = FeedbackStore(store_db)
    clients = [f"id:u{i}" for i in range(40)]
    before = {c: sticky_assign(store, exp, c).name for c in clients}
    assert before == {c: assign(exp, c).name for c in clients}  # nothing promoted: the weights' choice
    assert set(before.values()) == {"control", "candidate"}

    assert store.promote("e", "candidate").promoted == "candidate"
    assert {c: sticky_assign(store, exp, c).name for c in clients} == before  # assigned clients keep theirs
    assert {sticky_assign(store, exp, f"id:new{i}").name for i in range(30)} == {"candidate"}  # new ones don't

    assert store.retire("e", "control").retired == {"control"}
    assert {sticky_assign(store, exp, c).name for c in clients} == {"candidate"}  # control's clients moved
    assert store.select("SELECT DISTINCT variant FROM ab_assignments WHERE experiment = 'e'") == [("candidate",)]

    with pytest.raises(ExperimentStateError, match="promoted variant"):
        store.retire("e", "candidate")
    with pytest.raises(ExperimentStateError, match="no variant 'cndidate' in experiment 'e'; it has candidate, control"):
        store.promote("e", "cndidate")
    state = store.promote("e", "control", retire_others=True)  # back again: un-retires control
    assert state.status == {"control": "promoted", "candidate": "retired"}
    assert {sticky_assign(store, exp, c).name for c in clients} == {"control"}
    assert store.select("SELECT action, variant FROM ab_events ORDER BY id") == [
        ("promote", "candidate"), ("retire", "control"), ("promote", "control"), ("retire", "candidate")]
    store.close()


def test_the_stored_assignment_wins_and_the_first_writer_wins(store_db):
    """What makes replicas agree is the row in the store, not the hash: a stored variant is
    served even where the weights would pick another, and a second insert does not overwrite it."""
    exp = Experiment("e", (Variant("control"), Variant("candidate")))
    store = FeedbackStore(store_db)
    client = next(f"id:{i}" for i in range(100) if assign(exp, f"id:{i}").name == "control")
    assert store.assign_once("e", client, "candidate") == "candidate"
    assert store.assign_once("e", client, "control") == "candidate"  # another replica racing: reads the winner
    assert sticky_assign(store, exp, client).name == "candidate"
    store.close()


def test_live_experiment_weights():
    exp = Experiment("e", (Variant("a", weight=3), Variant("b", weight=1), Variant("c", weight=0)))
    weights = lambda st: [v.weight for v in live_experiment(exp, ExperimentState("e", st)).variants]  # noqa: E731
    assert weights({}) == [3, 1, 0]
    assert weights({"b": "promoted", "a": "retired"}) == [0, 1, 0]
    assert weights({"a": "retired"}) == [0, 1, 0]
    assert weights({"a": "retired", "b": "retired"}) == [3, 1, 0]  # nothing live: the config's weights stand
    assert weights({"zz": "promoted"}) == [3, 1, 0]  # a name this config lacks is ignored


def test_promote_and_retire_commands(store_db, tmp_path, capsys):
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"db": store_db, "experiment": {"name": "exp", "variants": [
        {"name": "control"}, {"name": "candidate", "checkpoint": "c.pt"}]}}))
    store = FeedbackStore(store_db)
    for variant in ("control", "candidate"):
        store.add_feedback(store.record_caption(served(variant)), rating=3)
    store.close()
    assert main(["promote", "candidate", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "experiment exp: candidate promoted, control live" in out and "keep their variant" in out
    assert main(["retire", "control", "--db", store_db, "--experiment", "exp"]) == 0
    assert "candidate promoted, control retired" in capsys.readouterr().out
    assert main(["retire", "candidate", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("error: 'candidate' is the promoted variant of 'exp'")
    assert main(["promote", "nope", "--config", str(cfg)]) == 2
    assert "no variant 'nope' in experiment 'exp'; it has candidate, control" in capsys.readouterr().err
    assert main(["promote", "candidate"]) == 2
    assert "--config serve.toml, or --db and --experiment" in capsys.readouterr().err
    assert main(["ab-report", "--db", store_db]) == 0
    out = capsys.readouterr().out
    assert next(x for x in out.splitlines() if x.startswith("candidate")).endswith("(promoted)")
    assert next(x for x in out.splitlines() if x.startswith("control")).endswith("(retired)")
    assert main(["promote", "x", "--db", str(tmp_path / "none.db"), "--experiment", "exp"]) == 2
    assert "feedback database not found" in capsys.readouterr().err


def test_promotes_and_retires_racing_on_one_store_leave_one_winner(store_db):
    """On PostgreSQL two promotes at once both won (read, then write, with no lock): 15 of 15."""
    import threading

    FeedbackStore(store_db).close()
    for trial in range(6):
        exp = f"race{trial}"
        stores = [FeedbackStore(store_db) for _ in range(2)]
        start = threading.Barrier(2)
        errors: list[Exception] = []

        def act(store, fn):
            start.wait()
            try:
                fn(store)
            except ExperimentStateError as e:
                errors.append(e)

        jobs = [lambda s: s.promote(exp, "a", variants=["a", "b"]), lambda s: s.promote(exp, "b", variants=["a", "b"])]
        threads = [threading.Thread(target=act, args=(s, j)) for s, j in zip(stores, jobs)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert sorted(stores[0].experiment_state(exp).status.values()).count("promoted") == 1
        retire = f"retire{trial}"
        jobs = [lambda s: s.retire(retire, "a", variants=["a", "b"]), lambda s: s.retire(retire, "b", variants=["a", "b"])]
        start = threading.Barrier(2)
        threads = [threading.Thread(target=act, args=(s, j)) for s, j in zip(stores, jobs)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert list(stores[0].experiment_state(retire).status.values()).count("retired") == 1
        assert any("no live variant" in str(e) for e in errors)
        [s.close() for s in stores]


def test_retire_refuses_to_leave_only_variants_at_weight_zero(store_db, tmp_path, capsys):
    """Variants a (weight 1) and b (weight 0): retiring a left no variant taking traffic, and the
    server fell back to the config's weights, so the retired a kept every client."""
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"db": store_db, "experiment": {"name": "w0", "variants": [
        {"name": "a", "weight": 1}, {"name": "b", "checkpoint": "b.pt", "weight": 0}]}}))
    FeedbackStore(store_db).close()
    assert main(["retire", "a", "--config", str(cfg)]) == 2
    assert "no live variant that takes traffic" in capsys.readouterr().err


@pytest.mark.parametrize("correction, says", [("x" * 501, "at most 500"), ("... !!!", "holds no words")])
def test_the_store_refuses_corrections_the_api_would(store_db, correction, says):
    """The web app stores feedback directly: a 12,000-character correction once went in."""
    store = FeedbackStore(store_db)
    cid = store.record_caption(served("a"))
    with pytest.raises(FeedbackError, match=says):
        store.add_feedback(cid, correction=correction)
    store.close()
