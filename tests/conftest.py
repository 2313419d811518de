"""Shared fixtures: tiny generated photos and captions, and a tiny model config."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image, ImageDraw

# No timed assertions: hypothesis's per-example deadline (200 ms) fails tests on a busy machine
# (seen with load 11 on 2 cores), and says nothing about correctness.
settings.register_profile("captioner", deadline=None)
settings.load_profile("captioner")

REPO = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("CAPTIONER_FLICKR8K", REPO.parent / "shared" / "data" / "flickr8k"))



def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module, its folder on sys.path as when it is run."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def refuses_before_work(name: str, argv: list[str], says: str, out, capsys) -> None:
    """benchmarks/NAME.py run with `argv` exits with an error naming `says`, writing no `out`."""
    with pytest.raises(SystemExit):
        load_benchmark(name).main(argv)
    assert says in capsys.readouterr().err
    assert not out.exists()


COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SHAPES = ("square", "circle")


def make_photo(path: Path, color: str, shape: str, size: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 255, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    img.save(path, quality=95)


def make_flickr_like(root: Path, n_per_kind: int = 3, layout: str = "token", with_splits: bool = True) -> Path:
    """A Flickr8k-shaped folder of generated photos: 'a red square', 'a blue circle', ..."""
    (root / "Images").mkdir(parents=True, exist_ok=True)
    text = root / "Flickr8k_text"
    text.mkdir(exist_ok=True)
    names, captions = [], []
    i = 0
    for color in COLORS:
        for shape in SHAPES:
            for k in range(n_per_kind):
                name = f"{1000 + i}_{color}{shape}.jpg"
                make_photo(root / "Images" / name, color, shape, seed=i)
                names.append(name)
                captions.append([f"a {color} {shape} .", f"A {color} {shape} on a plain background",
                                 f"the {shape} is {color}", f"a {color} {shape}", f"one {color} {shape} ."])
                i += 1
    if layout == "token":
        with open(text / "Flickr8k.token.txt", "w") as f:
            for name, caps in zip(names, captions):
                for j, c in enumerate(caps):
                    f.write(f"{name}#{j}\t{c}\n")
    else:
        with open(root / "captions.txt", "w") as f:
            f.write("image,caption\n")
            for name, caps in zip(names, captions):
                for c in caps:
                    f.write(f"{name},{c}\n")
    if with_splits:
        # every kind appears in every split: index k of each kind goes to train/dev/test
        splits = {"train": [], "dev": [], "test": []}
        for j, name in enumerate(names):
            k = j % n_per_kind
            splits["train" if k < n_per_kind - 2 else "dev" if k == n_per_kind - 2 else "test"].append(name)
        for s, ns in splits.items():
            (text / f"Flickr_8k.{s}Images.txt").write_text("\n".join(ns) + "\n")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_flickr_like(tmp_path / "data", n_per_kind=4)


TINY_MODEL = {
    "name": "tiny-sat",
    "encoder": "efficientnet-lite0",
    "decoder": "soft-attention-lstm",
    "decoder_params": {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 12, "region_dim": 20,
                       "dropout": 0.1, "alpha_c": 1.0},
}


@pytest.fixture
def tiny_model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-sat.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the whole session (skips, saying why, where none can start)."""
    import postgres

    ok, why = postgres.available()
    if not ok:
        if os.environ.get("CAPTIONER_REQUIRE_POSTGRES"):  # CI installed it: a skip would hide a failure
            pytest.fail(f"CAPTIONER_REQUIRE_POSTGRES is set but {why}")
        pytest.skip(why)
    cluster = postgres.Cluster()
    yield cluster
    cluster.stop()


STORE_BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORE_BACKENDS)
def store_db(request, tmp_path: Path) -> str:
    """A fresh, empty feedback store on each backend: a SQLite file path, then a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("pg_cluster").database()


def needs_flickr8k():
    return pytest.mark.skipif(not (FLICKR8K / "Images").is_dir(),
                              reason=f"Flickr8k copy not found at {FLICKR8K} (set CAPTIONER_FLICKR8K)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the reliability suite's counts (when any of it ran): inputs tried, faults
    injected, requests sent, failures (seen inside tests, plus reliability tests that failed)."""
    from reliability import COUNTS, LABELS

    reports = [r for key in ("passed", "failed") for r in terminalreporter.stats.get(key, [])
               if getattr(r, "when", "call") == "call" and "reliability" in r.keywords]
    if not reports and not COUNTS:
        return
    failed = sum(1 for r in reports if r.failed)
    counts = {**{k: COUNTS[k] for k in LABELS}, "failures": COUNTS["failures"] + failed}
    terminalreporter.write_sep("-", "reliability suite")
    terminalreporter.write_line(", ".join(f"{LABELS[k]}: {v}" for k, v in counts.items())
                                + f" ({len(reports)} tests)")
    out = os.environ.get("CAPTIONER_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps({**counts, "tests": len(reports)}, indent=2) + "\n")
