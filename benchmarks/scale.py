"""Folder-captioning throughput with 1 and 2 worker processes, and the speed-up of 2-process
training over 1, on this machine.

    python benchmarks/scale.py [--images 400] [--train-images 600] [--epochs 2]
                                          [--out benchmarks/results/scale.json] [--readme]

Needs no dataset: it generates photos (shapes on smooth backgrounds, 500x375 JPEG, so decoding
costs about what a real photo's does) in a temporary folder.

1. Captioning: `captioner caption DIR --out captions.jsonl` (shipped model, beam 3, batches of
   16) over --images photos, three ways: one process with 1 photo-loading worker process, one
   process with 2, and two processes under torchrun (1 loading worker each, 1 torch thread
   each). Images/s is the command's own count over its captioning loop (model loading and
   process start-up excluded; the whole command's wall time is kept too).
2. Training: a manifest of --train-images generated photos x 5 captions, features cached once,
   then `captioner train` (show-attend-tell, the default recipe's batch of 100 captions, same
   seed) for --epochs epochs in one process (torch's default threads) and in two under torchrun
   (1 thread each, the same global batch). The speed-up is the ratio of the mean training
   seconds per epoch (metrics.jsonl's train_seconds; dev decoding is excluded).

The results file records how much CPU other processes used during the run (from /proc/stat, less
this process's and its children's own time; the load average where /proc is missing): timings
taken while other work runs on the same cores say little, and the README block says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


from results_blocks import markers, replace_block

REPO = Path(__file__).resolve().parents[1]
README = REPO / "docs" / "results.md"  # where the generated blocks live
MARKERS = markers("scale")
COLORS = {"red": (200, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 70), "yellow": (220, 200, 40)}
SHAPES = ("square", "circle")


def make_photos(folder: Path, n: int, size: tuple[int, int] = (500, 375)) -> list[tuple[str, str, str]]:
    """n generated photos: [(file name, colour, shape)]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    out = []
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    for i in range(n):
        color, shape = kinds[i % len(kinds)]
        a, b = rng.integers(60, 255, 3), rng.integers(60, 255, 3)
        bg = (a * (1 - x) * (1 - y) + b * x * y + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(bg)
        d = ImageDraw.Draw(img)
        cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), rng.integers(h // 8, h // 4)
        (d.rectangle if shape == "square" else d.ellipse)((cx - r, cy - r, cx + r, cy + r), fill=COLORS[color])
        name = f"{i:06d}_{color}_{shape}.jpg"
        img.save(folder / name, quality=90)
        out.append((name, color, shape))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Run a command; (its stderr, wall seconds). A failure stops the benchmark with its output."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr, time.perf_counter() - t


def caption_run(folder: Path, work: Path, processes: int, workers: int, args: argparse.Namespace) -> dict:
    out = work / f"captions-{processes}x{workers}.jsonl"
    out.unlink(missing_ok=True)
    cli = ["caption", str(folder), "--out", str(out), "--workers", str(workers), "--batch-size", str(args.batch_size),
           "--beam-size", "3", "--no-progress", "--device", "cpu"]
    if processes == 1:
        err, wall = run([sys.executable, "-m", "captioner.cli", *cli])
    else:
        err, wall = run([*torchrun(processes), "-m", "captioner.cli", *cli], {"OMP_NUM_THREADS": "1"})
    m = re.search(r"captioned (\d+) photo\(s\) in ([\d.]+) s \(([\d.]+) images/s\)", err)
    if not m or int(m.group(1)) != args.images:
        raise RuntimeError(f"unexpected captioning summary:\n{err[-2000:]}")
    lines = out.read_text().splitlines()
    assert len(lines) == args.images and len({json.loads(x)["image"] for x in lines}) == args.images
    return {"processes": processes, "loading_workers": workers, "images": args.images,
            "images_per_second": round(int(m.group(1)) / float(m.group(2)), 2), "wall_seconds": round(wall, 1)}


def train_run(manifest: Path, work: Path, processes: int, args: argparse.Namespace) -> dict:
    out = work / f"run-{processes}"
    cli = ["train", "--data", str(manifest), "--out", str(out), "--cache-dir", str(work / "cache"), "--model",
           "show-attend-tell", "--epochs", str(args.epochs), "--no-progress", "--device", "cpu",
           "--set", "patience=100", "--set", "val_beam_size=1", "--set", "max_val_images=8"]
    if processes == 1:
        _, wall = run([sys.executable, "-m", "captioner.cli", *cli])
    else:
        _, wall = run([*torchrun(processes), "-m", "captioner.cli", *cli], {"OMP_NUM_THREADS": "1"})
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_seconds = [h["train_seconds"] for h in history]
    return {"processes": processes, "epoch_train_seconds": epoch_seconds,
            "mean_epoch_seconds": round(sum(epoch_seconds) / len(epoch_seconds), 2),
            "train_loss": [round(h["train_loss"], 4) for h in history], "wall_seconds": round(wall, 1)}


def write_manifest(folder: Path, photos: list[tuple[str, str, str]], dev: int = 8) -> Path:
    rows = []
    for i, (name, color, shape) in enumerate(photos):
        split = "dev" if i < dev else "train"
        for c in (f"a {color} {shape} .", f"a {shape} that is {color}", f"one {color} {shape} on a background",
                  f"the {color} {shape}", f"a picture of a {color} {shape}"):
            rows.append(json.dumps({"image": name, "caption": c, "split": split}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process on the machine has used, those this process and its finished
    children used), or None where /proc/stat is missing (not Linux)."""
    import resource

    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    everyone = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    mine = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return everyone, mine


def other_cores(start: tuple[float, float] | None, end: tuple[float, float] | None, wall: float) -> float | None:
    """Cores' worth of CPU that other processes used while the benchmark ran."""
    if start is None or end is None or wall <= 0:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / wall)


def loaded(others: float | None, load: list[float], cpus: int) -> bool:
    """Did other work share the cores? Judged from the CPU time other processes used during the
    run (over a quarter of a core); where that cannot be read, from the 1-minute load average
    before the run (above half the cores). The load average after the run is the benchmark's own."""
    if others is not None:
        return others > 0.25
    return load[0] > 0.5 * cpus


def readme_block(result: dict) -> str:
    """The README's quote of a results file: tables of its numbers, nothing typed by hand."""
    rows = ["| folder captioning | images/s | speed-up |", "|---|---|---|"]
    base = result["captioning"][0]["images_per_second"]
    for r in result["captioning"]:
        how = (f"{r['processes']} processes (torchrun), 1 loading worker each" if r["processes"] > 1 else
               f"1 process, {r['loading_workers']} loading worker(s)")
        rows.append(f"| {how} | {r['images_per_second']} | {r['images_per_second'] / base:.2f}x |")
    t = result["training"]
    rows += ["", "| training (show-attend-tell) | s per epoch | speed-up |", "|---|---|---|",
             f"| 1 process | {t['one']['mean_epoch_seconds']} | 1.00x |",
             f"| 2 processes (torchrun, DDP, gloo) | {t['two']['mean_epoch_seconds']} | **{t['speedup']}x** |", "", ""]
    s = result["settings"]
    load = result["load_average_before"][0], result["load_average_after"][0]
    others = result.get("other_processes_cores")
    busy = (f"other processes used {others:.2f} cores' worth of CPU during the run"
            if others is not None else f"load average {load[0]:.1f} before, {load[1]:.1f} after")
    line = (f"{s['images']} generated 500x375 photos, beam 3, batches of {s['batch_size']}; training on "
            f"{s['train_images']} generated photos x 5 captions, {s['epochs']} epoch(s). {result['machine']['cpus']} "
            f"CPU cores; {busy}. Source: `benchmarks/results/scale.json`.")
    if result["under_load"]:
        line += " **Measured while other work ran on these cores: not representative.**"
    return "\n".join(rows) + line


def update_readme(result: dict) -> None:
    replace_block("scale", readme_block(result), README)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400, help="photos to caption per configuration (default 400)")
    p.add_argument("--batch-size", type=int, default=16, help="photos per encoder call and beam search")
    p.add_argument("--train-images", type=int, default=600, help="generated training photos (default 600)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per configuration (default 2)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    p.add_argument("--readme", action="store_true", help="also rewrite the README's quote of the results")
    p.add_argument("--readme-only", action="store_true", help="rewrite the README's quote of --out; no run")
    args = p.parse_args(argv)
    if args.readme_only:
        result = json.loads(Path(args.out).read_text())
        update_readme(result)
        return result
    cpus = os.cpu_count() or 1
    before = list(os.getloadavg())
    cpu_start, wall_start = cpu_seconds(), time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.images)
        captioning = []
        for processes, workers in ((1, 1), (1, 2), (2, 1)):
            captioning.append(caption_run(work / "photos", work, processes, workers, args))
            print(json.dumps(captioning[-1]), flush=True)
        photos = make_photos(work / "train", args.train_images)
        manifest = write_manifest(work / "train", photos)
        run([sys.executable, "-m", "captioner.cli", "prepare", "--data", str(manifest), "--cache-dir",
             str(work / "cache"), "--check-images", "exists", "--no-progress", "--model", "show-attend-tell"])
        one, two = train_run(manifest, work, 1, args), train_run(manifest, work, 2, args)
        print(json.dumps(one), json.dumps(two), sep="\n", flush=True)
    after = list(os.getloadavg())
    others = other_cores(cpu_start, cpu_seconds(), time.monotonic() - wall_start)
    import torch

    result = {
        "settings": {"images": args.images, "batch_size": args.batch_size, "train_images": args.train_images,
                     "epochs": args.epochs},
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "load_average_before": [round(x, 2) for x in before], "load_average_after": [round(x, 2) for x in after],
        "other_processes_cores": None if others is None else round(others, 2),
        "under_load": loaded(others, before, cpus),
        "captioning": captioning,
        "training": {"one": one, "two": two,
                     "speedup": round(one["mean_epoch_seconds"] / two["mean_epoch_seconds"], 2)},
        "measured_at": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.readme:
        update_readme(result)
    print(readme_block(result))
    return result


if __name__ == "__main__":
    main()
