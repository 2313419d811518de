"""A captioning model: named config (data, one JSON file each), vocab and decoder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from captioner.inference.decode import Hypotheses, Samples, SearchConfig, beam_search, sample
from captioner.models.decoders import Ensemble, WithTunedTop, build_decoder
from captioner.models.encoders import EncoderConfig, TunedTop, get_encoder_config
from captioner.errors import ConfigError, OptionError
from captioner.data.vocab import Vocab


@dataclass
class ModelConfig:
    name: str  # registry name, e.g. "show-attend-tell"
    encoder: str  # encoder registry name, e.g. "efficientnet-lite0"
    decoder: str  # decoder arch registry name
    decoder_params: dict = field(default_factory=dict)  # the decoder's own typed config
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {"name", "encoder", "decoder", "decoder_params", "description"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {', '.join(unknown)}")
        missing = sorted({"name", "encoder", "decoder"} - set(d))
        if missing:
            raise ConfigError(f"model config: missing field(s) {', '.join(missing)}")
        return cls(**d)


def list_models() -> list[str]:
    """Names of the registered model configs (the JSON files in captioner/configs)."""
    files = resources.files("captioner.models") / "configs"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".json"))


def get_model_config(name: str) -> ModelConfig:
    """A registered model by name, or a model config JSON file by path."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model config file {name} not found")
    else:
        path = resources.files("captioner.models") / "configs" / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}, line {e.lineno}: not valid JSON: {e.msg}") from None


class CaptionModel(nn.Module):
    """Vocab + decoder + the encoder's config (the frozen encoder itself is built apart)."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, encoder_cfg: EncoderConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.vocab = vocab
        self.encoder_cfg = encoder_cfg or get_encoder_config(cfg.encoder)
        decoder = build_decoder(cfg.decoder, cfg.decoder_params, len(vocab), self.encoder_cfg.region_dim)
        # with a tuned encoder top, the decoder holds it: it is trained, saved and shipped with it;
        # in an ensemble each member holds the top it was trained with
        if self.encoder_cfg.split and isinstance(decoder, Ensemble):
            decoder.members = nn.ModuleList(WithTunedTop(TunedTop(self.encoder_cfg), m) for m in decoder.members)
        elif self.encoder_cfg.split:
            decoder = WithTunedTop(TunedTop(self.encoder_cfg), decoder)
        self.decoder = decoder
        # Beam ranking exponent this model was tuned with on dev; saved with its checkpoint.
        self.length_penalty = 1.0
        self.no_repeat_ngram = 0  # n-gram blocking size this model was tuned with (0 = off)
        # decoder precision it was scored with: fp32 (auto keeps fp32), or bf16 / int8 (auto picks per CPU;
        # captioner.inference.precision)
        self.precision = "fp32"

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decoder(features, tokens)

    def search_config(self, beam_size: int = 3, max_len: int = 25, n_best: int = 1,
                      length_penalty: float | None = None, no_repeat_ngram: int | None = None) -> SearchConfig:
        """Search settings, with this model's dev-tuned values wherever the caller gives none."""
        return SearchConfig(
            beam_size=beam_size, max_len=max_len, n_best=max(n_best, 1),
            length_penalty=self.length_penalty if length_penalty is None else length_penalty,
            no_repeat_ngram=self.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram)

    @torch.no_grad()
    def generate(self, features: torch.Tensor, search: SearchConfig) -> Hypotheses:
        """Region features (B, N, C) -> best hypotheses per image."""
        v = self.vocab
        return beam_search(self.decoder, features, v.bos_id, v.eos_id, v.pad_id,
                           search, banned_ids=(v.bos_id, v.unk_id))

    @torch.no_grad()
    def sample(self, features: torch.Tensor, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
               max_len: int = 25, generator: torch.Generator | None = None) -> Samples:
        """`n` sampled captions per image (rows image-major); temperature 0 is greedy."""
        v = self.vocab
        return sample(self.decoder, features, v.bos_id, v.eos_id, v.pad_id,
                      max_len=max_len, n=n, temperature=temperature, top_p=top_p,
                      banned_ids=(v.bos_id, v.unk_id), generator=generator)

    @property
    def recognition_head(self) -> nn.Linear | None:
        """The recognition head made for this model's tuned top (a Linear(1280, 1000) on its
        pooled output, `models.recognition`), attached by `load_checkpoint` from the checkpoint's
        sidecar file; None: no head (recognition uses the stock classifier)."""
        return self.__dict__.get("_recognition_head")

    def attach_recognition_head(self, head: nn.Linear | None) -> None:
        """Use `head` (made for this model's tuned top) for recognition; None: the stock classifier."""
        self.__dict__["_recognition_head"] = head  # not a submodule: never in the state dict
        self.forget_object_namer()  # a namer built before recognises the old way

    def forget_object_namer(self) -> None:
        """Drop the namer built so far: it holds a copy of the weights as they were, so the next
        `object_namer()` builds a new one from the weights as they are."""
        self.__dict__.pop("_object_namer", None)

    def train(self, mode: bool = True) -> "CaptionModel":
        """nn.Module.train; training moves the weights the namer copied, so it is dropped (rebuilt
        from the trained weights when next asked for)."""
        if mode:
            self.forget_object_namer()
        return super().train(mode)

    def object_namer(self, threshold: float | None = None):
        """This model's `objects.ObjectNamer` (built once: a grown-vocab copy and the recognizer);
        `threshold` overrides the tuned one."""
        from captioner.models.objects import ObjectNamer

        namer = self.__dict__.get("_object_namer")  # not a submodule: never in the state dict
        if namer is None:
            namer = ObjectNamer(self)
            self.__dict__["_object_namer"] = namer
        if threshold is not None:
            number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
            if not number or not 0 < threshold <= 1:
                raise OptionError(f"objects threshold {threshold!r} is out of range: above 0, at most 1 "
                                  "(a recognition score)")
            namer.threshold = threshold
        return namer

    def captions(self, features: torch.Tensor, search: SearchConfig, objects: bool = False) -> list[str]:
        """Best caption per image; with `objects`, naming a confidently recognised object."""
        if objects:
            return self.object_namer().captions(features, search)
        hyps = self.generate(features, search)
        return [self.vocab.decode(row[0].tolist()) for row in hyps.tokens]
