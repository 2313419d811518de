"""The README is a user's front page, and its commands are tests: they cannot drift again."""
import contextlib
import io
import re
import shlex

from captioner.cli import main

from conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", README, flags=re.S)
DOCS = sorted((REPO / "docs").glob("*.md"))


def first(kind: str) -> str:
    return next(code for lang, code in BLOCKS if lang == kind)


def test_first_command_installs_and_captions_an_example(capsys, monkeypatch):
    install, _, command = first("bash").strip().partition(" && ")
    assert install == "pip install ."
    args = shlex.split(command)
    assert args[:2] == ["captioner", "caption"]
    monkeypatch.chdir(REPO)
    for path in args[2:]:
        assert (REPO / path).is_file(), path
    assert main(args[1:]) == 0
    sentence = capsys.readouterr().out.strip()
    assert len(sentence.split()) >= 4 and sentence.islower()


def test_second_command_is_what_ci_runs():
    test_command = [code for lang, code in BLOCKS if lang == "bash"][1].strip()
    assert "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_python_quick_start_runs_as_written(monkeypatch):
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(first("python"), "README.md", "exec"), {})
    printed = out.getvalue().strip()
    assert printed and len(printed.split()) >= 4


def test_the_package_exports_the_facade_and_the_examples_work_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: examples/ is the package's own copy
    from captioner import Captioner

    text = Captioner.load().caption("examples/cat.jpg").text
    assert len(text.split()) >= 4


def test_default_names_the_shipped_model_for_caption_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["caption", "--model", "default", "examples/cat.jpg"]) == 0
    assert len(capsys.readouterr().out.split()) >= 4
    assert main(["export", "default", str(tmp_path / "out.pt")]) == 0
    from captioner import Captioner

    assert Captioner.load(tmp_path / "out.pt").name == Captioner.load("default").name


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 250
    assert len(DOCS) >= 4
    for word in ("commit", "family", "EPYC"):
        assert word not in README, word


def test_every_relative_link_resolves():
    broken = []
    for page in [REPO / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_results_table_quotes_the_shipped_weights_own_test_scores():
    """After a new default ships, release/model_card.py regenerates docs/results.md and the card:
    the measured row carries the test scores `captioner export --metrics` stored in the weights."""
    from captioner.evaluation.metrics import METRIC_NAMES
    from captioner.models.checkpoint import read_checkpoint

    test = read_checkpoint("default")["metrics"]["test"]
    results = (REPO / "docs" / "results.md").read_text()
    block = results.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    row = next(line for line in block.splitlines() if "captioner default" in line)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == [f"{test[k]:.3f}" for k in METRIC_NAMES], "rerun release/model_card.py on the shipped run"
    assert row in (REPO / "src" / "captioner" / "weights" / "MODEL_CARD.md").read_text()
