"""What a progressive-JPEG scan bomb costs, decoded as before and refused as now.

    python benchmarks/scan_bomb.py [--side 3000] [--scans 4000] [--out benchmarks/results/scan_bomb.json]

Builds the bomb the reliability suite uses (tests/corpus.py `scan_bomb`: a flat photo saved
progressive, its last scan repeated), times Pillow decoding it unguarded (what the loader did
before it counted scans), then the loader refusing it from its scan count, and a normal
progressive photo of the same size decoded through the loader for scale.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from corpus import encode, scan_bomb  # noqa: E402

from captioner.data.images import jpeg_scans, load_image  # noqa: E402
from captioner.errors import ImageError  # noqa: E402


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", type=int, default=3000)
    p.add_argument("--scans", type=int, default=4000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bomb = scan_bomb(args.side, args.scans)
    normal = encode(Image.new("RGB", (args.side, args.side), (120, 130, 140)), "JPEG", progressive=True, quality=90)

    def refused() -> None:
        try:
            load_image(bomb, name="bomb.jpg")
        except ImageError:
            return
        raise SystemExit("the loader decoded the bomb")

    result = {
        "side": args.side, "scans": jpeg_scans(bomb), "bomb_bytes": len(bomb),
        "unguarded_decode_s": round(seconds(lambda: Image.open(io.BytesIO(bomb)).load()), 3),
        "loader_refusal_s": round(seconds(refused), 4),
        "normal_progressive_scans": jpeg_scans(normal),
        "normal_progressive_load_s": round(seconds(lambda: load_image(normal)), 3),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
