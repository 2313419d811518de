"""The README's quick start is itself a test."""
import re
import shlex

from captioner.inference.api import Captioner
from captioner.cli import main

from conftest import REPO

README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(?:bash|python)?\n(.*?)```", README, flags=re.S)


def test_first_block_installs_and_captions_an_example(capsys, monkeypatch):
    first = BLOCKS[0].strip()
    install, _, command = first.partition(" && ")
    assert install == "pip install ."
    args = shlex.split(command)
    assert args[:2] == ["captioner", "caption"]
    monkeypatch.chdir(REPO)
    for path in args[2:]:
        assert (REPO / path).is_file(), path
    assert main(args[1:]) == 0
    sentence = capsys.readouterr().out.strip()
    assert len(sentence.split()) >= 4 and sentence.islower()


def test_second_block_is_what_ci_runs():
    test_command = BLOCKS[1].strip()
    assert "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_python_quick_start():
    cap = Captioner.load().caption(REPO / "examples" / "cat.jpg", beam_size=3, n_best=2)
    assert len(cap.text.split()) >= 4
    assert cap.attention.shape == (len(cap.words), 7, 7)
    assert len(cap.alternatives) == 1 and cap.alternatives[0][1] <= cap.score


def test_default_model_card_quotes_measured_results():
    card = (REPO / "src" / "captioner" / "weights" / "MODEL_CARD.md").read_text()
    assert "BLEU-4" in card and "CIDEr" in card
    block = README.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    assert "captioner default" in block, "run benchmarks/model_card.py to fill the results block"


def test_results_block_quotes_the_shipped_weights_own_test_scores():
    """After a new default is shipped, the README and model card must be regenerated from it:
    the measured row carries the test scores `captioner export --metrics` stored in the weights."""
    from captioner.models.checkpoint import read_checkpoint
    from captioner.evaluation.metrics import METRIC_NAMES

    test = read_checkpoint(REPO / "src" / "captioner" / "weights" / "default.pt")["metrics"]["test"]
    block = README.split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    row = next(line for line in block.splitlines() if "captioner default" in line)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells == [f"{test[k]:.3f}" for k in METRIC_NAMES], "rerun benchmarks/model_card.py on the shipped run"
    card = (REPO / "src" / "captioner" / "weights" / "MODEL_CARD.md").read_text()
    assert row in card
