"""`captioner` command line: caption, prepare, train, evaluate, compare, export, ensemble, average,
models, serve, app, ab-report, promote, retire, finetune."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from captioner.errors import CaptionerError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
DATA_FORMATS = ["auto", "flickr8k", "flickr30k", "coco", "karpathy", "manifest", "prepared"]
PREPARE_HELP = """Check a dataset before training: photos and captions per split; missing,
unreadable and duplicate photos; empty and over-long captions; caption lengths; vocabulary
coverage. Problems are listed with their file and line or record, and stop it (exit 2) unless
--drop-bad leaves those records out. Then the feature cache is filled (under torchrun, shared
out across the ranks).

Formats (--format, detected by default):
  flickr8k   FOLDER with Flickr8k.token.txt (+ Flickr_8k.{train,dev,test}Images.txt) or captions.txt, Images/
  flickr30k  FOLDER with results_20130124.token or results.csv ('|'-separated), flickr30k_images/
  coco       annotations/captions_{train,val}{2014,2017}.json (FOLDER or one FILE), photos in {train,val}20xx/
  karpathy   dataset_{coco,flickr8k,flickr30k}.json (FILE), photos beside it (or --image-root)
  manifest   FILE.csv (image,caption[,split]) or FILE.jsonl ({"image", "caption"|"captions", "split"?}),
             photo paths relative to --image-root (default: the manifest's folder); no split column
             = a seeded split
  prepared   DIR written by prepare --out
"""


def expand_paths(paths: Sequence[str], recursive: bool = False) -> list[Path]:
    """Files as given; a folder becomes the images in it (and in its subfolders with
    `recursive`), sorted."""
    out = []
    for p in map(Path, paths):
        try:
            folder = p.is_dir()
        except OSError:  # a name the system refuses (too long): the photo's own error says so
            folder = False
        if folder:
            found = p.rglob("*") if recursive else p.iterdir()
            out += sorted(f for f in found if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-size", type=int, default=3, help="beam width; 1 = greedy (default 3)")
    p.add_argument("--max-len", type=int, default=25, help="most words per caption (default 25)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="rank beams by logprob / length**this (default: the model's tuned value)")
    p.add_argument("--no-repeat-ngram", type=int, default=None,
                   help="never repeat an n-gram of this size; 0 = off (default: the model's tuned value)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "int8"), default="auto",
                   help="decoder weights in matrix products: auto (default) = bf16 on a CPU with native "
                        "bfloat16, per-channel int8 on other CPUs, fp32 for models that ask for it "
                        "(docs/speed.md)")
    p.add_argument("--objects", choices=("on", "off"), default="on",
                   help="name objects the encoder recognises in the caption and list them (default on; "
                        "off = the captions of the model alone)")
    p.add_argument("--objects-threshold", type=float, default=None,
                   help="with --objects on: recognition score an object needs to be put into the caption "
                        "(default: the tuned value)")



def _whole(low: int, high: int):
    """An argparse type: a whole number from `low` to `high`, or a usage error naming the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range: {low} to {high}")
        return value
    return parse


def _read_json(path: str, option: str):
    """A JSON file a command was given, or a clear error naming the option and the file."""
    from captioner.errors import ConfigError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not a JSON file"
        raise ConfigError(f"{option} {path}: {why}") from None


def _new_output(out: str | None, option: str, inputs: Sequence[str | Path | None]) -> None:
    """Refuse an output path that is one of the command's inputs (or, for a dataset folder, its
    files) or a folder: writing it would replace what the command reads."""
    from captioner.errors import ConfigError
    from captioner.models.checkpoint import resolve_checkpoint

    if out is None:
        return
    target = Path(out).expanduser().resolve()
    if target.is_dir():
        raise ConfigError(f"{option} {out}: a folder; give a file path")
    for given in inputs:
        if given is None:
            continue
        source = Path(resolve_checkpoint(given)).expanduser().resolve()
        if target == source or (source.is_dir() and source in target.parents):
            raise ConfigError(f"{option} {out}: it is also an input ({given}); writing it would replace what "
                              f"this command reads. Choose another path")


def _dataset_args(p: argparse.ArgumentParser) -> None:
    """Where a dataset is and how to read it (prepare, train, evaluate, finetune); None = the
    training config's value (TrainConfig)."""
    g = p.add_argument_group("dataset")
    g.add_argument("--data", default=None,
                   help="dataset folder or file (default ../shared/data/flickr8k): see `captioner prepare --help`")
    g.add_argument("--format", default=None, choices=DATA_FORMATS,
                   help="dataset format (default auto: detected from the files)")
    g.add_argument("--image-root", default=None,
                   help="folder the dataset's photo paths are relative to (default: beside its caption file)")
    g.add_argument("--layout", default=None, choices=["auto", "token", "csv"],
                   help="Flickr8k/Flickr30k caption file: token or csv (default: token where present)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default ~/.cache/captioner)")


def _run_config_args(p: argparse.ArgumentParser) -> None:
    """A training config: file, overrides, model and encoder (prepare, train)."""
    g = p.add_argument_group("training config")
    g.add_argument("--config", default=None, help="JSON file of training config fields")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable)")
    g.add_argument("--model", default=None, help="registered model name (see `captioner models`)")
    g.add_argument("--encoder", default=None,
                   help="the image encoder, e.g. efficientnet-lite2 (its own feature cache; default: the recipe's)")


def _train_config(args: argparse.Namespace, **explicit):
    """The training config the dataset and config options name."""
    from captioner.training.config import load_train_config

    return load_train_config(getattr(args, "config", None), getattr(args, "set", []), data=args.data,
                             data_format=args.format, layout=args.layout, image_root=args.image_root,
                             cache_dir=args.cache_dir, model=getattr(args, "model", None),
                             encoder=getattr(args, "encoder", None), **explicit)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None,
                   help="sample captions at this temperature instead of beam search (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None,
                   help="with --temperature: nucleus sampling mass (default 1); an error without it")
    p.add_argument("--seed", type=int, default=None, help="with --temperature: seed for repeatable samples")


def cmd_caption(args: argparse.Namespace) -> int:
    if args.out:
        return _caption_to_file(args)
    if args.alt_text_csv:
        print("error: --alt-text-csv needs --out (the captions file it is written from)", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("error: under torchrun, caption into a file with --out (the ranks share the photos)", file=sys.stderr)
        return 2
    import torch

    from captioner.inference.api import Captioner
    from captioner.inference.plots import save_attention_figure

    paths = expand_paths(args.paths, args.recursive)
    if not paths:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    if args.attention and (Path(args.attention).is_dir() or not Path(args.attention).parent.is_dir()):
        print(f"error: --attention {args.attention}: give a PNG file's path in an existing folder", file=sys.stderr)
        return 2
    captioner = Captioner.load(args.model, precision=args.precision)
    # options are checked before any photo is read: a bad one fails at once, not after a batch
    captioner.check_search(args.beam_size, args.max_len, args.n_best, args.temperature, args.top_p,
                           length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram, seed=args.seed)
    if args.objects == "on" and args.objects_threshold is not None:
        captioner.model.object_namer(args.objects_threshold)
    failed = 0
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start:start + args.batch_size]
        pixels, good = [], []
        for p in chunk:  # one bad photo gets its error; the others are still captioned
            try:
                pixels.append(captioner.preprocess(p))
                good.append(p)
            except CaptionerError as e:
                failed += 1
                print(f"error: {e}", file=sys.stderr)
        if not good:
            continue
        feats = captioner.encode_pixels(torch.stack(pixels), chunk=4)  # (B, N, C), the good photos at once
        caps = captioner.caption_features(feats, beam_size=args.beam_size, max_len=args.max_len,
                                          n_best=args.n_best, length_penalty=args.length_penalty,
                                          no_repeat_ngram=args.no_repeat_ngram, temperature=args.temperature,
                                          top_p=args.top_p, seed=args.seed, objects=args.objects == "on")
        for p, c in zip(good, caps):
            if args.json:
                print(json.dumps({"image": str(p), **c.to_dict()}))
            else:
                print(f"{p}: {c.text}" if len(paths) > 1 else c.text)
                for alt, score in c.alternatives:
                    print(f"    alt ({score:.3f}): {alt}")
            if args.attention:
                target = Path(args.attention)
                if len(paths) > 1:
                    target = target.with_name(f"{target.stem}-{p.stem}{target.suffix or '.png'}")
                save_attention_figure(p, c, target)
    return 1 if failed else 0


def _caption_to_file(args: argparse.Namespace) -> int:
    from captioner.inference.api import Captioner
    from captioner.inference.bulk import caption_collection, collect
    from captioner.distributed import setup

    photos = collect(args.paths, IMAGE_SUFFIXES, args.recursive)
    if not photos:
        print("error: no images found in the given paths", file=sys.stderr)
        return 2
    if args.attention or args.temperature is not None or args.top_p is not None or args.seed is not None:
        print("error: --attention, --temperature, --top-p and --seed work without --out only", file=sys.stderr)
        return 2
    env = setup(args.device)
    captioner = Captioner.load(args.model, device=env.device, precision=args.precision)
    search = dict(beam_size=args.beam_size, max_len=args.max_len, n_best=args.n_best,
                  length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                  objects=args.objects == "on")
    result = caption_collection(captioner, photos, args.out, batch_size=args.batch_size, workers=args.workers,
                                search=search, env=env, progress=not args.no_progress,
                                alt_text_csv=args.alt_text_csv)
    if env.is_main:
        print(f"captioned {result.captioned} photo(s) in {result.seconds:.1f} s ({result.images_per_second:.1f} "
              f"images/s); {result.skipped} already done, {result.failed} unreadable; wrote {args.out}"
              + (f" and {args.alt_text_csv}" if args.alt_text_csv else ""), file=sys.stderr)
    return 1 if result.failed else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from captioner.data.datasets import load_dataset, save_prepared
    from captioner.files import atomic_write_text
    from captioner.distributed import setup
    from captioner.data.report import build_report, check_images, format_report
    from captioner.training.dataset import cache_features, data_options, mirror_features

    cfg = _train_config(args, progress=False if args.no_progress else None)
    env = setup(cfg.device)
    dataset = load_dataset(cfg.data, cfg.data_format, data_options(cfg), strict=False)
    bad, duplicates = check_images(dataset, args.check_images, args.workers, env, cfg.progress and env.is_main)
    report = build_report(dataset, bad, duplicates, args.check_images, cfg.min_word_count, cfg.max_caption_len)
    left_out = {p["image"] for p in report.problems
                if p["image"] and p["kind"] in ("missing image", "unreadable image", "split conflict")}
    if args.drop_bad:
        report = replace(report, dropped_images=len(left_out))
    if env.is_main:
        print(format_report(report))
    if report.errors and not args.drop_bad:
        if env.is_main:
            print(f"error: {report.errors} problem(s) in the data (listed above); fix them, or leave the bad "
                  f"records out with --drop-bad", file=sys.stderr)
        return 2
    dataset = dataset.without({p.image for p in bad})
    if args.out and env.is_main:
        path = save_prepared(dataset, args.out)
        atomic_write_text(Path(args.out) / "report.json", json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"prepared: {path} ({len(dataset.records)} images); train and evaluate read it with --data {args.out}")
    if not args.no_features:
        cache = cache_features(dataset, cfg, env=env)
        mirrored = mirror_features(dataset, cfg, env=env)
        if env.is_main:
            print(f"features: {cache.path} {tuple(cache.features.shape)}")
            if mirrored is not None:
                print(f"mirrored features (mirror_prob {cfg.mirror_prob}): {mirrored.path} "
                      f"{tuple(mirrored.features.shape)}")
    if args.json and env.is_main:
        print(json.dumps(report.to_dict()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from captioner.training.train import train

    cfg = _train_config(args, out=args.out, epochs=None if args.resume else args.epochs,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                        progress=False if args.no_progress else None)
    result = train(cfg, resume=args.resume, epochs=args.epochs if args.resume else None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from captioner.inference.api import Captioner
    from captioner.distributed import resolve_device
    from captioner.evaluation.evaluate import evaluate

    captioner = Captioner.load(args.checkpoint, device=resolve_device(args.device), precision=args.precision)
    search = captioner.model.search_config(args.beam_size, args.max_len, 1, args.length_penalty,
                                           args.no_repeat_ngram)
    out = args.captions_out
    data = _train_config(args)  # the dataset options, with the training config's defaults
    _new_output(out, "--captions-out", [args.checkpoint, data.data])
    scores, notes = evaluate(captioner.model, data.data, args.split, search, layout=data.layout,
                             cache_dir=data.cache_dir, captions_out=out, progress=not args.json,
                             data_format=data.data_format, image_root=data.image_root,
                             device=str(captioner.device), objects=args.objects == "on",
                             objects_threshold=args.objects_threshold)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"model {captioner.name} ({captioner.info['path']}), {args.split} split, beam {args.beam_size}, "
          f"length penalty {search.length_penalty}, no-repeat n-gram {search.no_repeat_ngram}, "
          f"precision {captioner.precision}, objects {args.objects}")
    for k, v in scores.items():
        print(f"{k:>8}: {v:.4f}")
    if out:
        print(f"captions written to {out}")
    if args.json:
        print(json.dumps(scores))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from captioner.models.checkpoint import load_checkpoint, recognition_head_path, save_checkpoint, save_recognition_head

    model, ckpt = load_checkpoint(args.checkpoint)
    if args.length_penalty is not None:
        model.length_penalty = args.length_penalty
    if args.no_repeat_ngram is not None:
        model.no_repeat_ngram = args.no_repeat_ngram
    if args.precision is not None:
        model.precision = args.precision
    metrics = dict(ckpt.get("metrics", {}))
    if args.metrics:
        metrics["test"] = _read_json(args.metrics, "--metrics")
    extra = {"train_config": ckpt["train_config"]} if "train_config" in ckpt else {}
    floats = [v for v in ckpt["decoder_state"].values() if v.is_floating_point()]
    half = args.half or bool(floats) and all(v.dtype == torch.float16 for v in floats)  # as the source keeps them
    checksum = save_checkpoint(args.out, model, metrics=metrics, extra=extra, half=half)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    head, sidecar = model.recognition_head, recognition_head_path(args.out)
    if head is not None:  # the model's recognition head travels with it, bound to the new file
        save_recognition_head(sidecar, head.weight, head.bias, checksum)
        print(f"wrote {sidecar} (its recognition head)")
    elif sidecar.exists():  # a head made for the file this export replaced no longer fits it
        sidecar.unlink()
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from captioner.models.checkpoint import write_checkpoint
    from captioner.models.ensemble import ensemble_checkpoint

    _new_output(args.out, "--out", args.checkpoints)
    write_checkpoint(ensemble_checkpoint(args.checkpoints, args.name), args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB): {len(args.checkpoints)} decoders "
          f"averaged word by word; tune its beam on dev (release/tune_search.py), then "
          f"`captioner export --length-penalty ... --no-repeat-ngram ...`")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from captioner.models.average import average_checkpoint
    from captioner.models.checkpoint import write_checkpoint

    _new_output(args.out, "--out", args.checkpoints)
    write_checkpoint(average_checkpoint(args.checkpoints), args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB): the mean of {len(args.checkpoints)} "
          f"checkpoints' weights; score it on dev (captioner evaluate --split dev) before shipping it")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from captioner.models.model import get_model_config, list_models

    for name in list_models():
        cfg = get_model_config(name)
        print(f"{name:24s} {cfg.encoder:20s} {cfg.decoder:22s} {cfg.description}")
    return 0


def _serve_config(args: argparse.Namespace):
    from captioner.service.config import load_serve_config

    return load_serve_config(args.config, host=getattr(args, "host", None), port=getattr(args, "port", None),
                             db=args.db)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from captioner.service.serve import run
    except ImportError as e:
        print(f"error: the server needs the serve extra (pip install \"captioner[serve]\"): {e}", file=sys.stderr)
        return 2
    run(_serve_config(args))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from captioner.service.app import launch
    except ImportError as e:
        print(f"error: the web app needs the serve extra (pip install \"captioner[serve]\"): {e}", file=sys.stderr)
        return 2
    cfg = _serve_config(args)  # checked here, so a bad config fails before streamlit starts
    return launch(args.config, cfg, port=args.port)


def cmd_ab_report(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from captioner.errors import OptionError
    from captioner.service.ab import build_report, format_report
    from captioner.service.feedback import FeedbackStore

    # Welch's test is two-sided and Bonferroni-corrected: p < alpha / pairs. At 0 nothing, and
    # from 0.5 up nearly anything, would be "significant"; NaN compares false with every p.
    if not 0 < args.alpha <= 0.5:
        raise OptionError(f"--alpha must be above 0 and at most 0.5 (a significance level, e.g. 0.05), "
                          f"not {args.alpha}")
    store = FeedbackStore(args.db, create=False)
    try:
        known = store.experiments()
        if args.experiment is not None and args.experiment not in known:
            raise OptionError(f"--experiment {args.experiment!r}: no such experiment in {store.name}; "
                              + (f"it has {', '.join(map(repr, known))}" if known else "it has no captions yet"))
        experiments = [args.experiment] if args.experiment is not None else known
        if not experiments:
            print(f"no captions recorded in {store.name} yet")
            return 0
        for i, name in enumerate(experiments):
            rep = build_report(name, store.traffic(name), store.ratings(name), alpha=args.alpha,
                               status=store.experiment_state(name).status)
            if args.json:
                print(json.dumps(asdict(rep)))
            else:
                print(("\n" if i else "") + format_report(rep))
    finally:
        store.close()
    return 0


def _experiment_store(args: argparse.Namespace):
    """(store, experiment name, the config's variants and their weights, or None) for promote and
    retire: --config gives all three, --db and --experiment override it."""
    from captioner.errors import ConfigError
    from captioner.service.config import load_serve_config
    from captioner.service.feedback import FeedbackStore

    cfg = load_serve_config(args.config) if args.config else None
    db = args.db or (cfg.db if cfg else None)
    experiment = args.experiment or (cfg.experiment.name if cfg else None)
    if db is None or experiment is None:
        raise ConfigError("name the store and the experiment: --config serve.toml, or --db and --experiment")
    variants = ({v.name: v.weight for v in cfg.experiment.variants} if cfg and experiment == cfg.experiment.name
                else None)
    return FeedbackStore(db, create=False), experiment, variants


def _print_state(experiment: str, state, variants) -> None:
    names = sorted(set(variants or []) | set(state.status))
    print(f"experiment {experiment}: " + ", ".join(f"{n} {state.of(n)}" for n in names))


def cmd_promote(args: argparse.Namespace) -> int:
    store, experiment, variants = _experiment_store(args)
    try:
        state = store.promote(experiment, args.variant, retire_others=args.retire_others, variants=variants)
    finally:
        store.close()
    _print_state(experiment, state, variants)
    print(f"{args.variant} now takes every new client on every replica of {store.name}; "
          + ("every other client moves to it on its next request" if args.retire_others else
             "clients already assigned keep their variant until it is retired"))
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    store, experiment, variants = _experiment_store(args)
    try:
        state = store.retire(experiment, args.variant, variants=variants)
    finally:
        store.close()
    _print_state(experiment, state, variants)
    print(f"{args.variant} takes no traffic now; its clients move to a live variant on their next request")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from captioner.evaluation.compare import compare_files, format_comparison

    comparison = compare_files(args.a, args.b, args.resamples, args.seed, args.confidence)
    print(json.dumps(asdict(comparison)) if args.json else format_comparison(comparison))
    return 0


def _format_finetune(report: dict) -> list[str]:
    """The finetune report in lines; a report cut short by a refusal has only its first parts."""
    pct = round(100 * report["confidence"])
    lines = [f"{report['corrections']} corrections of {report['photos']} photos: learnt from {report['learn_photos']}, "
             f"checked on {report['check_photos']} held out"
             + (f" ({report['unreadable_photos']} stored photo(s) could not be read: skipped)"
                if report.get("unreadable_photos") else "")
             + (f"; {report['replayed_photos']} replayed {report['dataset']} train photos"
                if "replayed_photos" in report else "")]
    r = report["relevance"]
    lines.append(f"do the corrections describe their photos? the base's captions score CIDEr-D {r['own']:.3f} "
                 f"against their own photo's corrections, {r['others']:.3f} against other photos' ({pct}% interval "
                 f"of the difference [{r['diff_interval'][0]:+.3f}, {r['diff_interval'][1]:+.3f}])")
    v = report.get("vocab")
    if v and v["new_words"]:
        shown = ", ".join(f"{w} (from {p})" for w, p in list(v["new_words"].items())[:12])
        lines.append(f"vocab {v['before']} -> {v['after']} words: {shown}"
                     + (" ..." if len(v["new_words"]) > 12 else ""))
    if v and v["below_min_count"]:
        lines.append(f"note: used fewer than {v['min_word_count']} times, learnt as <unk>: "
                     + ", ".join(list(v["below_min_count"])[:10]))
    gate = f"{report['dataset']} {report['gate_split']} ({report['gate_why']})"
    objects = "objects on" if report.get("objects", True) else "objects off"
    for key, what in (("check", "check set (held-out corrections)"), ("gate", gate)):
        if key not in report:
            continue
        r = report[key]
        lo, hi = r["diff_interval"]
        lines.append(f"CIDEr-D on the {what}, {r['photos']} photos, {objects}: {r['before']:.3f} -> {r['after']:.3f} "
                     f"({r['diff']:+.3f}, {pct}% interval of the difference [{lo:+.3f}, {hi:+.3f}])")
    return lines


def cmd_finetune(args: argparse.Namespace) -> int:
    from captioner.training.finetune import FinetuneConfig, FinetuneRefused, finetune

    data = _train_config(args)  # the dataset options, with the training config's defaults
    cfg = FinetuneConfig(db=args.db, checkpoint=args.checkpoint, data=data.data, data_format=data.data_format,
                         layout=data.layout, image_root=data.image_root, out=args.out, cache_dir=data.cache_dir,
                         check_fraction=args.check_fraction, min_word_count=args.min_word_count,
                         epochs=args.epochs, lr=args.lr, replay_ratio=args.replay_ratio,
                         scst_epochs=args.scst_epochs, scst_lr=args.scst_lr, scst_replay_ratio=args.scst_replay_ratio,
                         correction_repeats=args.correction_repeats, gate_split=args.gate_split,
                         dev_images=args.dev_images, objects=args.objects == "on", force=args.force,
                         half=args.half, seed=args.seed, progress=not args.no_progress)
    try:
        report = finetune(cfg)
    except FinetuneRefused as e:
        print("\n".join(_format_finetune(e.report)))
        print(json.dumps(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    lines = _format_finetune(report)
    if report["gate"]["diff_interval"][1] < 0:
        lines.append(f"warning: worse on {report['gate_split']} beyond noise; written anyway (--force)")
    print("\n".join(lines))
    print(f"wrote {args.out}{' (fp16 weights, as the base)' if report['half'] else ''}: serve it as an A/B "
          f"variant beside the current model (docs/serving.md, Learning from feedback)")
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("caption", help="caption photos (files or folders)")
    p.add_argument("paths", nargs="+", help="image files or folders of images")
    p.add_argument("--model", default="default", help="checkpoint file, or default (the shipped model)")
    _search_args(p)
    _sampling_args(p)
    p.add_argument("--n-best", type=int, default=1, help="also print the next-best captions")
    p.add_argument("--batch-size", type=_whole(1, 4096), default=16, help="images per batched beam search")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--attention", default=None, help="write the per-word attention figure to this PNG")
    p.add_argument("--recursive", action="store_true", help="also the photos in subfolders of a folder")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="large collections: append one JSON line per photo to this file, resumably "
                        "(a rerun skips photos already in it); under torchrun the ranks share the photos")
    p.add_argument("--alt-text-csv", default=None, metavar="FILE.csv",
                   help="with --out: also write image,alt_text rows for every photo in the captions file")
    p.add_argument("--workers", type=_whole(0, 256), default=2,
                   help="with --out: photo-loading processes; 0 = in this process (default 2)")
    p.add_argument("--device", default="auto", help="with --out: cpu, cuda or auto (default: a GPU if present)")
    p.add_argument("--no-progress", action="store_true", help="with --out: no progress bar")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("prepare", help="check a dataset, report on it, and fill its feature cache",
                       description=PREPARE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _dataset_args(p)
    _run_config_args(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the checked dataset to DIR/dataset.json (+ report.json); --data DIR reads it")
    p.add_argument("--check-images", default="decode", choices=["decode", "header", "exists"],
                   help="decode every photo (default; also finds byte-identical duplicates), read headers "
                        "only, or check existence only")
    p.add_argument("--drop-bad", action="store_true",
                   help="leave bad records out (listed in the report) instead of stopping")
    p.add_argument("--no-features", action="store_true", help="check and report only; no feature cache")
    p.add_argument("--workers", type=_whole(1, 256), default=4, help="threads checking photos (default 4)")
    p.add_argument("--json", action="store_true", help="last line: the report as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    _dataset_args(p)
    _run_config_args(p)
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--epochs", type=int, default=None,
                   help="cross-entropy epochs; with --resume, extends a finished run to this many")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: a GPU if present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)")
    _dataset_args(p)
    p.add_argument("--split", default="test", choices=["train", "dev", "test", "all"],
                   help="split to score; all = every photo (e.g. a set made only for evaluation)")
    p.add_argument("--checkpoint", default="default", help="checkpoint file, or default (the shipped model)")
    p.add_argument("--captions-out", default=None, metavar="FILE.json",
                   help="also write each photo's caption and references here (the input of captioner compare)")
    p.add_argument("--json", action="store_true", help="last line: the scores as one JSON object")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    _search_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="is b better than a? a paired bootstrap over two evaluate captions files")
    p.add_argument("a", help="captions file of the baseline (captioner evaluate --captions-out)")
    p.add_argument("b", help="captions file of the candidate, on the same split")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap draws, 100 to 100000 (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws, 0 or more (default 0)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--json", action="store_true", help="the comparison as one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write a model-only checkpoint (optionally fp16) for shipping")
    p.add_argument("checkpoint", help="a checkpoint file (e.g. a run's best.pt), or default (the shipped model)")
    p.add_argument("out")
    p.add_argument("--half", action="store_true",
                   help="store weights as fp16 (default: as the source stores them)")
    p.add_argument("--metrics", default=None, help="JSON file of test scores to record in the checkpoint")
    p.add_argument("--length-penalty", type=float, default=None, help="the beam ranking exponent to ship")
    p.add_argument("--no-repeat-ngram", type=int, default=None, help="the n-gram blocking size to ship")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), default=None,
                   help="the decoder precision the model was scored with: fp32 keeps `auto` on fp32; "
                        "bf16 or int8 let `auto` pick bf16 or int8 per CPU (docs/speed.md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("ensemble", help="join trained checkpoints (same vocab and encoder) into one model")
    p.add_argument("checkpoints", nargs="+", help="two or more member checkpoints")
    p.add_argument("--out", required=True, help="the ensemble checkpoint to write")
    p.add_argument("--name", default="", help="the model's name (default ensemble-of-N)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("average", help="average checkpoints of one model (e.g. a run's epochs) into one")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints of the same model")
    p.add_argument("--out", required=True, help="the averaged checkpoint to write")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("models", help="list the registered model configs")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", help="REST API server (needs the serve extra)")
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--config", default=None, help="serve config, JSON or TOML: models, A/B experiment, limits, keys")
    p.add_argument("--db", default=None, help="feedback store: a SQLite file or a postgresql:// URL "
                                                 "(default: the config's, captioner.db)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("app", help="Streamlit web app (needs the serve extra)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--config", default=None, help="serve config: the same models and feedback store")
    p.add_argument("--db", default=None, help="feedback store: a SQLite file or a postgresql:// URL "
                                                 "(default: the config's, captioner.db)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("ab-report", help="per-variant traffic and ratings, and whether they differ")
    p.add_argument("--db", required=True, help="feedback store written by serve or app: a SQLite file or "
                                                  "a postgresql:// URL")
    p.add_argument("--experiment", default=None, help="one experiment (default: every one in the store)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level, above 0 and at most 0.5 (default 0.05)")
    p.add_argument("--json", action="store_true", help="one JSON object per experiment")
    p.set_defaults(func=cmd_ab_report)

    for name, func, what in (("promote", cmd_promote, "make a variant the default for new traffic on every "
                                                      "replica (assigned clients keep theirs until it is retired)"),
                             ("retire", cmd_retire, "take a variant out of service: its clients move to a live one")):
        p = sub.add_parser(name, help=what)
        p.add_argument("variant", help="the variant's name, as in the serve config and ab-report")
        p.add_argument("--config", default=None, help="serve config: its store, experiment and variant names")
        p.add_argument("--db", default=None, help="the store: a SQLite file or a postgresql:// URL (default: the "
                                                  "config's)")
        p.add_argument("--experiment", default=None, help="the experiment (default: the config's)")
        if name == "promote":
            p.add_argument("--retire-others", action="store_true",
                           help="also retire every other variant: all clients move to this one")
        p.set_defaults(func=func)

    p = sub.add_parser("finetune", help="learn from users' corrected captions; checked before it is written")
    p.add_argument("--db", required=True, help="feedback store with corrections: a SQLite file or a postgresql:// URL")
    p.add_argument("--checkpoint", default="default",
                   help="the base model: a checkpoint file, or default (the shipped model)")
    _dataset_args(p)
    p.add_argument("--out", required=True, help="the new checkpoint (serve it as an A/B variant)")
    p.add_argument("--check-fraction", type=float, default=0.2,
                   help="corrected photos held out to check the result on (default 0.2, at least one)")
    p.add_argument("--min-word-count", type=int, default=3,
                   help="a new word joins the vocab once the corrections use it this often (default 3)")
    p.add_argument("--epochs", type=int, default=2,
                   help="cross-entropy passes teaching the new words (default 2; skipped where there are none)")
    p.add_argument("--scst-epochs", type=int, default=3, help="self-critical passes after them (default 3)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak cross-entropy learning rate of the new words' rows, the only weights it trains "
                        "(default 1e-3)")
    p.add_argument("--replay-ratio", type=float, default=4.0,
                   help="replayed original train photos per corrected photo (default 4)")
    p.add_argument("--correction-repeats", type=int, default=3,
                   help="copies of each corrected photo per cross-entropy pass (default 3)")
    p.add_argument("--scst-lr", type=float, default=5e-5, help="self-critical learning rate (default 5e-5)")
    p.add_argument("--scst-replay-ratio", type=float, default=1.0,
                   help="replayed photos per corrected photo in the self-critical stage (default 1)")
    p.add_argument("--gate-split", choices=("auto", "dev", "test"), default="auto",
                   help="the base's held-out split the gate scores: auto (default) = dev, or test where the base "
                        "was refit on train + dev (the shipped model)")
    p.add_argument("--dev-images", type=int, default=0, help="photos of the gate's split it scores (default 0: all)")
    p.add_argument("--objects", choices=("on", "off"), default="on",
                   help="caption the check set and the gate's split as served: with named objects (default on), "
                        "or off = the model alone")
    p.add_argument("--force", action="store_true", help="write the model even if the gate finds it worse beyond noise")
    p.add_argument("--half", action="store_true", help="store fp16 weights even where the base has fp32 ones")
    p.add_argument("--seed", type=int, default=0, help="seeds the check split, the replay sample and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined_before = _in_process_group()
    try:
        return args.func(args)
    except CaptionerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given to write or read that the system refuses (a folder, no such place)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not joined_before and _in_process_group():  # under torchrun: leave the group this command joined
            from captioner.distributed import teardown

            teardown()


def _in_process_group() -> bool:
    if "torch" not in sys.modules:  # not imported yet: no group joined (and keep `--help` fast)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
