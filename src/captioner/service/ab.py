"""A/B experiments: variants (one checkpoint each) with traffic weights, sticky hash-based
assignment of clients, and the statistics of the report (mean rating, 95% confidence
interval, Welch's t-test), written with the standard library alone."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from captioner.errors import ConfigError

if TYPE_CHECKING:
    from captioner.inference.api import Captioner
    from captioner.data.images import ImageLimits
    from captioner.service.feedback import ExperimentState, FeedbackStore

DEFAULT_CHECKPOINT = "default"  # a variant's checkpoint naming the model shipped in the package


@dataclass(frozen=True)
class Variant:
    name: str  # what the API, the database and the report call it, e.g. "control"
    checkpoint: str = DEFAULT_CHECKPOINT  # file inside the server's model directory, or "default"
    weight: float = 1.0  # share of clients assigned to it, relative to the other variants


@dataclass(frozen=True)
class Experiment:
    name: str = "default"  # recorded with every caption served
    variants: tuple[Variant, ...] = (Variant("default"),)  # the first is the control

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)


def experiment_from_dict(d: dict, where: str = "experiment") -> Experiment:
    """The `experiment` table of a serve config -> Experiment, checked field by field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a table/object with name and variants")
    unknown = sorted(set(d) - {"name", "variants"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    name = d.get("name", "default")
    raw = d.get("variants")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected a non-empty string")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.variants: expected a non-empty list of variants")
    variants = []
    for i, v in enumerate(raw):
        at = f"{where}.variants[{i}]"
        if not isinstance(v, dict):
            raise ConfigError(f"{at}: expected a table/object with name, checkpoint and weight")
        unknown = sorted(set(v) - {"name", "checkpoint", "weight"})
        if unknown:
            raise ConfigError(f"{at}: unknown field(s) {', '.join(unknown)}")
        vname, ckpt, weight = v.get("name"), v.get("checkpoint", DEFAULT_CHECKPOINT), v.get("weight", 1.0)
        if not isinstance(vname, str) or not vname or not vname.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{at}.name: expected a name of letters, digits, '-' or '_', not {vname!r}")
        if not isinstance(ckpt, str) or not ckpt:
            raise ConfigError(f"{at}.checkpoint: expected a file name inside the model directory")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"{at}.weight: expected a number >= 0, not {weight!r}")
        variants.append(Variant(vname, ckpt, float(weight)))
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.variants: duplicate variant names in {names}")
    if sum(v.weight for v in variants) <= 0:
        raise ConfigError(f"{where}.variants: at least one weight must be > 0")
    return Experiment(name, tuple(variants))


def resolve_checkpoint(model_dir: str | Path, checkpoint: str) -> Path:
    """A variant's checkpoint -> its file, which must lie inside `model_dir` (symlinks and
    '..' resolved first); "default" is the shipped model."""
    if checkpoint == DEFAULT_CHECKPOINT:
        from captioner.inference.api import default_model_path

        return default_model_path()
    if "\0" in checkpoint:
        raise ConfigError(f"checkpoint {checkpoint!r}: a file name cannot hold a NUL character")
    root = Path(model_dir).resolve()
    path = (root / checkpoint).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(f"checkpoint {checkpoint!r} is outside the model directory {root}")
    if not path.is_file():
        raise ConfigError(f"checkpoint {checkpoint!r} not found in the model directory {root}")
    return path


def assign(experiment: Experiment, client_id: str) -> Variant:
    """The client's variant: a hash of (experiment, client) picks a point in [0, 1) that falls
    in one variant's share of the weights. Deterministic, so a client always gets the same one."""
    digest = hashlib.sha256(f"{experiment.name}\0{client_id}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2 ** 64
    total = sum(v.weight for v in experiment.variants)
    edge = 0.0
    for v in experiment.variants:
        edge += v.weight / total
        if point < edge and v.weight > 0:
            return v
    return next(v for v in reversed(experiment.variants) if v.weight > 0)


def live_experiment(experiment: Experiment, state: "ExperimentState") -> Experiment:
    """The experiment as new traffic sees it, given the store's state: a promoted variant takes
    all new clients; otherwise the config's weights, with retired variants at 0. A promoted or
    retired name this config lacks is ignored; were every variant retired, the config's weights stand."""
    promoted = state.promoted
    if promoted is not None and experiment.variant(promoted) is not None:
        weights = {v.name: float(v.name == promoted) for v in experiment.variants}
    else:
        weights = {v.name: (0.0 if v.name in state.retired else v.weight) for v in experiment.variants}
    if sum(weights.values()) <= 0:
        return experiment
    return Experiment(experiment.name, tuple(Variant(v.name, v.checkpoint, weights[v.name])
                                             for v in experiment.variants))


def sticky_assign(store: "FeedbackStore", experiment: Experiment, client_id: str) -> Variant:
    """The client's variant, stored so that every replica on one database gives the same one: a
    client's first request stores `assign(live experiment)` (insert if absent, then read back:
    replicas racing on one client agree); later requests get the stored variant until it is
    retired, when the client moves to the live experiment's choice. A stored variant this
    replica's config lacks is served as the replica's own choice and left stored as it is."""
    stored, state = store.lookup(experiment.name, client_id)
    fresh = assign(live_experiment(experiment, state), client_id)
    if stored is None:
        stored = store.assign_once(experiment.name, client_id, fresh.name)
    elif stored in state.retired and stored != fresh.name:
        stored = store.assign_once(experiment.name, client_id, fresh.name, replace=stored)
    variant = experiment.variant(stored)
    return variant if variant is not None and stored not in state.retired else fresh


@dataclass
class ServedModel:
    """A variant's loaded model with what the API reports about it."""

    variant: Variant
    captioner: "Captioner"
    version: str  # first 12 hex digits of the checkpoint file's SHA-256: changes with the weights
    path: Path


def file_version(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def load_variants(experiment: Experiment, model_dir: str | Path, limits: "ImageLimits | None" = None
                  ) -> dict[str, ServedModel]:
    """Load every variant's checkpoint (each must lie inside `model_dir`); `limits` says which
    photos they open."""
    from captioner.inference.api import Captioner

    out = {}
    for v in experiment.variants:
        path = resolve_checkpoint(model_dir, v.checkpoint)
        out[v.name] = ServedModel(v, Captioner.load(path, limits=limits), file_version(path), path)
    return out


# --- statistics for the report ---------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The t such that P(T <= t) = q (bisection on t_cdf)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


@dataclass
class RatingStats:
    """One variant's ratings: how many, their mean and its 95% confidence interval."""

    n: int
    mean: float | None
    sd: float | None  # sample standard deviation (n - 1)
    ci95: tuple[float, float] | None  # t-interval for the mean; None below 2 ratings


def rating_stats(ratings: Sequence[float]) -> RatingStats:
    n = len(ratings)
    if n == 0:
        return RatingStats(0, None, None, None)
    mean = sum(ratings) / n
    if n < 2:
        return RatingStats(n, mean, None, None)
    sd = math.sqrt(sum((r - mean) ** 2 for r in ratings) / (n - 1))
    half = t_ppf(0.975, n - 1) * sd / math.sqrt(n)
    return RatingStats(n, mean, sd, (mean - half, mean + half))


@dataclass
class Comparison:
    """Welch's t-test of variant b's mean rating against variant a's."""

    a: str
    b: str
    diff: float  # mean(b) - mean(a)
    t: float
    df: float  # Welch-Satterthwaite degrees of freedom
    p: float  # two-sided p-value
    significant: bool  # p below alpha (after the Bonferroni correction for several comparisons)


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(t, df, two-sided p) of Welch's unequal-variance t-test; needs 2+ values in each."""
    sa, sb = rating_stats(a), rating_stats(b)
    if sa.sd is None or sb.sd is None:
        raise ValueError("Welch's t-test needs at least 2 ratings per variant")
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    diff = sb.mean - sa.mean
    if va + vb == 0:  # no spread at all: any difference is certain, none is none
        return (math.copysign(math.inf, diff) if diff else 0.0), float(sa.n + sb.n - 2), (0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    p = 2.0 * (1.0 - t_cdf(abs(t), df))
    return t, df, min(1.0, max(0.0, p))


@dataclass
class VariantReport:
    variant: str
    captions: int  # captions served to clients the experiment assigned to this variant
    stats: RatingStats
    status: str = "live"  # "live", "promoted" (the default for new traffic) or "retired"


@dataclass
class Report:
    experiment: str
    variants: list[VariantReport]
    comparisons: list[Comparison] = field(default_factory=list)
    alpha: float = 0.05
    verdict: str = ""


def build_report(experiment: str, traffic: dict[str, int], ratings: dict[str, list[int]],
                 alpha: float = 0.05, status: dict[str, str] | None = None) -> Report:
    """Per-variant traffic and ratings -> stats, every pair compared (Bonferroni-corrected);
    `status` names promoted and retired variants."""
    status = status or {}
    names = sorted(set(traffic) | set(ratings))
    rep = Report(experiment, [VariantReport(n, traffic.get(n, 0), rating_stats(ratings.get(n, [])),
                                            status.get(n, "live")) for n in names],
                 alpha=alpha)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
             if len(ratings.get(a, [])) >= 2 and len(ratings.get(b, [])) >= 2]
    level = alpha / max(len(pairs), 1)
    for a, b in pairs:
        t, df, p = welch_test(ratings[a], ratings[b])
        diff = sum(ratings[b]) / len(ratings[b]) - sum(ratings[a]) / len(ratings[a])
        rep.comparisons.append(Comparison(a, b, diff, t, df, p, p < level))
    if len(names) < 2:
        rep.verdict = "only one variant has traffic: nothing to compare"
    elif not pairs:
        rep.verdict = "not enough ratings yet (need at least 2 per variant) to compare variants"
    else:
        wins = [c for c in rep.comparisons if c.significant]
        if not wins:
            rep.verdict = (f"no significant difference in mean rating (Welch's t-test, alpha {alpha}"
                           f"{', Bonferroni-corrected' if len(pairs) > 1 else ''}); keep collecting ratings")
        else:
            rep.verdict = "; ".join(
                f"{c.b if c.diff > 0 else c.a} is rated higher than {c.a if c.diff > 0 else c.b} "
                f"(difference {abs(c.diff):.2f}, p = {c.p:.3g}): significant" for c in wins)
    return rep


def format_report(rep: Report) -> str:
    """The report as a plain-text table and a verdict."""
    lines = [f"experiment {rep.experiment}",
             f"{'variant':16s} {'captions':>8s} {'ratings':>7s} {'mean':>6s}  95% CI"]
    for v in rep.variants:
        s = v.stats
        mean = f"{s.mean:.2f}" if s.mean is not None else "-"
        ci = f"[{s.ci95[0]:.2f}, {s.ci95[1]:.2f}]" if s.ci95 else "-"
        lines.append(f"{v.variant:16s} {v.captions:8d} {s.n:7d} {mean:>6s}  {ci}"
                     + (f"  ({v.status})" if v.status != "live" else ""))
    for c in rep.comparisons:
        lines.append(f"{c.b} vs {c.a}: difference {c.diff:+.2f}, Welch t = {c.t:.2f}, df = {c.df:.1f}, "
                     f"p = {c.p:.3g}")
    lines.append(f"verdict: {rep.verdict}")
    return "\n".join(lines)
