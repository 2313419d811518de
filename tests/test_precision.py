"""bf16 decoder weights for inference: same captions on real-size decisions, chosen per model."""
import pytest
import torch
from torch import nn

from captioner.inference import precision
from captioner.inference.api import Captioner
from captioner.models.checkpoint import load_checkpoint, save_checkpoint
from captioner.cli import main
from captioner.models.decoders import build_decoder
from captioner.models.model import CaptionModel, ModelConfig
from captioner.inference.precision import Bf16Linear, bf16_linears, resolve_precision
from captioner.data.vocab import Vocab

from conftest import TINY_MODEL
from test_decoders import SMALL


def test_bf16_linear_is_the_linear_up_to_bf16_rounding():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    fast = Bf16Linear(lin)
    assert fast.weight.dtype == torch.bfloat16 and fast(x).dtype == torch.float32
    assert set(fast.state_dict()) == set(lin.state_dict())  # same names: state dicts read as before
    torch.testing.assert_close(fast(x), lin(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_every_decoder_steps_in_bf16_close_to_fp32(arch):
    torch.manual_seed(0)
    dec = build_decoder(arch, SMALL[arch], 30, 40).eval()
    feats, prev = torch.randn(3, 9, 40), torch.randint(0, 30, (3,))
    with torch.no_grad():
        ref, _ = dec.step(prev, dec.init_state(feats))
        n = bf16_linears(dec)
        got, state = dec.step(prev, dec.init_state(feats))
    tied = sum(1 for m in dec.modules() if hasattr(m, "bf16_inference"))  # the transformer's output layer
    assert n == sum(1 for m in dec.modules() if isinstance(m, Bf16Linear)) + tied > 0
    assert tied == (arch in ("transformer", "ensemble"))  # SMALL["ensemble"] has a transformer member
    assert not any(isinstance(m, nn.Linear) for m in dec.modules())
    assert got.dtype == torch.float32 and state["alpha"].dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.02)


def test_auto_follows_the_model_and_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert resolve_precision("auto", "bf16", "cpu") == "bf16"
    assert resolve_precision(None, "fp32", "cpu") == "fp32"
    assert resolve_precision("fp32", "bf16", "cpu") == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert resolve_precision("auto", "bf16", "cpu") == "fp32"  # emulated bf16 would be slower
    assert resolve_precision("bf16", "fp32", "cpu") == "bf16"  # asked for: given
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "fp32", "cpu")


def test_export_records_the_precision_and_captioner_applies_it(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig.from_dict(TINY_MODEL), Vocab.build(["a red square"], min_count=1))
    save_checkpoint(tmp_path / "m.pt", model)
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "b.pt"), "--half", "--precision", "bf16"]) == 0
    loaded, ckpt = load_checkpoint(tmp_path / "b.pt")
    assert ckpt["decode"]["precision"] == "bf16" and loaded.precision == "bf16"
    cap = Captioner.load(tmp_path / "b.pt")
    assert cap.precision == "bf16"
    assert any(isinstance(m, Bf16Linear) for m in cap.model.decoder.modules())
    assert Captioner.load(tmp_path / "b.pt", precision="fp32").precision == "fp32"
    assert Captioner.load(tmp_path / "m.pt").precision == "fp32"  # older files: fp32
    feats = torch.randn(2, 49, 1280)
    assert len(cap.model.captions(feats, cap.model.search_config(beam_size=2, max_len=4))) == 2
