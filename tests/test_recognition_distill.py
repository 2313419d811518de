"""The recognition stage: the stock classifier distilled into the tuned top and a linear head,
the captions held where the stage started; the head is written beside best.pt, bound to it, and
travels with the model through export."""
import torch

from captioner.cli import main
from captioner.models.checkpoint import load_checkpoint, read_checkpoint, recognition_head_path
from captioner.models.objects import ObjectNamer
from captioner.training.config import load_train_config
from captioner.training.recognition_distill import RecognitionDistillation, kl
from captioner.training.train import train
from captioner.data.vocab import Vocab
from test_train_smoke import tiny_config
from test_tuned_top import TUNED, _tuned_model


def test_a_step_teaches_the_stock_classes_and_holds_the_words():
    vocab = Vocab.build(["a dog runs on the grass", "a cat sits on a mat"] * 3, 1)
    model = _tuned_model(0, vocab)
    with torch.no_grad():  # a top far from the stock one, as training for captions leaves it
        for p in model.decoder.top.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = load_train_config(None, ["scst_lr=1e-3", "recognition_encoder_lr_scale=1.0"])
    stage = RecognitionDistillation(model, cfg)
    torch.manual_seed(0)
    feats = torch.randn(4, 49, 448)
    seqs = torch.tensor([vocab.encode(c, 10) for c in ["a dog runs on the grass"] * 4])
    rows = torch.arange(4)
    with torch.no_grad():
        stock = stage.stock(feats)
        start = stage.head(model.decoder.top(feats).mean(1)).log_softmax(-1)
    first = stage.step(feats, seqs, rows)
    assert abs(first["recognition_kl"] - kl(stock, start).item()) < 1e-4
    assert first["words_kl"] < 1e-6  # the model is where it started
    for _ in range(15):
        last = stage.step(feats, seqs, rows)
    assert last["recognition_kl"] < 0.5 * first["recognition_kl"]
    assert last["words_kl"] < 0.1 * last["recognition_kl"] + 1e-3
    assert not any(p.requires_grad for p in stage.start.parameters())  # the start it is held to stays


def test_a_tuned_run_ends_with_a_head_bound_to_its_best_checkpoint(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, tiny_model_file, epochs=1, encoder=TUNED, recognition_epochs=1)
    train(cfg)
    head = recognition_head_path(out / "best.pt")
    assert head.is_file() and (out / "best-captions.pt").is_file() and (out / "recognition.json").is_file()
    model, ckpt = load_checkpoint(out / "best.pt")
    assert model.recognition_head is not None
    assert ObjectNamer(model).recognizer.mode == "head"
    assert "recognition_distillation" in ckpt["metrics"]
    # the stage trained: the head left `_fc`, and the captioning weights it started from are kept
    assert (model.recognition_head.weight - _stock_fc_weight(model).half().float()).abs().max() > 1e-3
    kept = read_checkpoint(out / "best-captions.pt")["decoder_state"]
    assert any(not torch.equal(kept[k], v) for k, v in ckpt["decoder_state"].items() if v.is_floating_point())

    # resuming a finished run does not run the stage again
    before = head.stat().st_mtime_ns
    train(cfg, resume=True)
    assert head.stat().st_mtime_ns == before

    # export carries the head to the exported file, bound to it
    exported = tmp_path / "shipped.pt"
    assert main(["export", str(out / "best.pt"), str(exported), "--half"]) == 0
    shipped, _ = load_checkpoint(exported)
    assert shipped.recognition_head is not None
    torch.testing.assert_close(shipped.recognition_head.weight, model.recognition_head.weight)


def _stock_fc_weight(model) -> torch.Tensor:
    from captioner.models.recognition import Recognizer

    return Recognizer(model.encoder_cfg, "stock").fc.weight


def test_a_run_without_a_tuned_top_has_no_recognition_stage(tiny_data, tiny_model_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, tiny_model_file, epochs=1, recognition_epochs=2))
    assert not recognition_head_path(out / "best.pt").exists() and not (out / "best-captions.pt").exists()
