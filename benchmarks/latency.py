"""Caption latency against the encoder's own: one photo at a time, models already loaded,
everything compared measured in the same rounds.

    python benchmarks/latency.py [--model PATH] [--rounds 20] [--threads N] [--out benchmarks/results/latency-native.json]

Each round takes the next example photo and times, one after another: one forward pass of the
stock EfficientNet-Lite0 (the ImageNet classifier with its shipped weights, eager, on the
preprocessed photo; as shipped and in channels-last memory), then `Captioner.caption(path)` (file read, resize, encoder, search) with
beam 3 in each precision (fp32, int8, auto = what users get) and fp32 with the modules as
trained (`lean=False`), greedy in auto, and beam 3 and greedy in auto with objects off. Interleaving matters: timing one mode in a block and
the next in another lets a neighbour's job land on one of them only (a block of greedy calls
once read slower than beam 3 so). The report gives each mode's median, the ratio of medians to
the stock forward, and the median of per-round ratios (each caption over the same round's
forward), with the CPU's ISA flags, torch's thread count and the load average: on a shared
machine read the ratios, not the milliseconds.

Run it with kernels held to AVX2, as on most CPUs without native bfloat16:

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/latency.py --out benchmarks/results/latency-avx2.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from captioner.files import atomic_write_text
from captioner.inference.api import Captioner
from captioner.models.encoders import get_encoder_config, preprocess, pretrained_backbone

REPO = Path(__file__).resolve().parents[1]
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS")
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_info() -> dict:
    """The CPU's model name and the ISA flags that decide the kernels, from /proc/cpuinfo, with
    what torch uses (its capability level, and the ISA caps set in the environment)."""
    name, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    from captioner.inference.precision import native_bf16

    return {"model_name": name, "flags": {f: f in flags for f in FLAGS},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16_in_torch": native_bf16(), "isa_env": {k: os.environ.get(k) for k in ISA_ENV},
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latency-native.json"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.threads < 0:
        p.error("--threads must be 0 (torch's default) or more")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    captioners = {"fp32": Captioner.load(args.model, precision="fp32"),
                  "int8": Captioner.load(args.model, precision="int8"),
                  "auto": Captioner.load(args.model, precision="auto"),
                  "fp32_as_trained": Captioner.load(args.model, precision="fp32", lean=False)}
    load_s = time.perf_counter() - started
    stock = pretrained_backbone(get_encoder_config("efficientnet-lite0")).eval()
    stock_cl = pretrained_backbone(get_encoder_config("efficientnet-lite0")).eval().to(memory_format=torch.channels_last)
    photos = sorted((REPO / "examples").glob("*.jpg"))
    pixels = [preprocess(ph, get_encoder_config("efficientnet-lite0"))[None] for ph in photos]
    pixels_cl = [x.contiguous(memory_format=torch.channels_last) for x in pixels]

    # the stock forward as shipped (contiguous) and in channels-last (faster on CPU): ratios to both
    modes = {"stock_lite0_forward": lambda i: stock(pixels[i]),
             "stock_lite0_forward_channels_last": lambda i: stock_cl(pixels_cl[i])}
    for name, cap in captioners.items():
        modes[f"caption_beam3_{name}"] = lambda i, cap=cap: cap.caption(photos[i], beam_size=3)
    modes["caption_greedy_auto"] = lambda i: captioners["auto"].caption(photos[i], beam_size=1)
    # named objects (on by default, docs/objects.md) cost recognition and, where the caption misses
    # its object, a second search: the model alone for comparison
    modes["caption_beam3_auto_objects_off"] = lambda i: captioners["auto"].caption(photos[i], beam_size=3,
                                                                                   objects=False)
    modes["caption_greedy_auto_objects_off"] = lambda i: captioners["auto"].caption(photos[i], beam_size=1,
                                                                                    objects=False)

    times: dict[str, list[float]] = {m: [] for m in modes}
    load_before = os.getloadavg()
    first_call_s = {}
    with torch.no_grad():
        for i in range(len(photos)):  # warm-up: first calls build (and trace) the encoders and plan kernels
            for m, fn in modes.items():
                t = time.perf_counter()
                fn(i)
                first_call_s.setdefault(m, round(time.perf_counter() - t, 2))
        for r in range(args.rounds):
            i = r % len(photos)
            for m, fn in modes.items():
                t = time.perf_counter()
                fn(i)
                times[m].append((time.perf_counter() - t) * 1000)
    load_after = os.getloadavg()

    rows = {}
    for m, ts in times.items():
        rows[m] = {"median_ms": round(statistics.median(ts), 2)}
        if m.startswith("stock"):
            continue
        for suffix, base in (("", times["stock_lite0_forward"]),
                             ("_channels_last", times["stock_lite0_forward_channels_last"])):
            rows[m]["ratio_of_medians" + suffix] = round(statistics.median(ts) / statistics.median(base), 2)
            rows[m]["median_round_ratio" + suffix] = round(statistics.median(t / b for t, b in zip(ts, base)), 2)
    greedy, beam = times["caption_greedy_auto"], times["caption_beam3_auto"]
    result = {
        "model": captioners["auto"].info["path"].replace(str(REPO) + "/", ""),
        "auto_precision": captioners["auto"].precision, "photos": [ph.name for ph in photos],
        "rounds": args.rounds, "load_seconds_all_four": round(load_s, 1),
        "first_call_seconds": first_call_s,  # includes building (lean: tracing and freezing) the encoder
        "cpu": cpu_info(),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "note": "shared machine (other engineers' jobs running): read the ratios, measured in the same rounds",
        "modes": rows,
        "greedy_over_beam3_auto_median_round_ratio": round(statistics.median(g / b for g, b in zip(greedy, beam)), 2),
        "greedy_over_beam3_objects_off_median_round_ratio": round(statistics.median(
            g / b for g, b in zip(times["caption_greedy_auto_objects_off"], times["caption_beam3_auto_objects_off"])), 2),
        "objects_on_over_off_beam3_median_round_ratio": round(statistics.median(
            a / b for a, b in zip(beam, times["caption_beam3_auto_objects_off"])), 2),
        "captions": {name: cap.caption(photos[0]).text for name, cap in captioners.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
