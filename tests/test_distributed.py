"""Two CPU processes under torchrun (gloo on 127.0.0.1) against one: the same loss curve for the
same global batch and seed, the same feature cache, the same captions of a folder."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioner.cli import main

from builders import photos
from conftest import REPO, TINY_MODEL, make_flickr_like


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_cache(cache_dir):
    (folder,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return json.loads((folder / "index.json").read_text())["names"], np.load(folder / "features.npy")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    data = make_flickr_like(tmp_path / "data", n_per_kind=5)  # 18 train, 6 dev, 6 test photos
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps({**TINY_MODEL, "decoder_params": {**TINY_MODEL["decoder_params"], "dropout": 0.0}}))
    pics = tmp_path / "pics"
    photos(pics, n_per_kind=1)

    def commands(tag: str) -> list[list[str]]:
        # 3 photos per step: shares of 2 and 1 photos (unequal token counts); 16 photos: a last
        # step of 1 photo, where rank 1 has no share at all.
        train = ["train", "--data", str(data), "--model", str(model), "--out", str(tmp_path / f"run-{tag}"),
                 "--cache-dir", str(tmp_path / f"cache-{tag}"), "--epochs", "2", "--batch-size", "15",
                 "--no-progress", "--device", "cpu"]
        train += [x for kv in ("encoder=", "mirror_prob=0", "scst_epochs=0", "scst_soup=1", "max_train_images=16", "min_word_count=1", "warmup_steps=2", "lr=0.01", "amp=off",
                               "val_beam_size=1", "val_max_len=5") for x in ("--set", kv)]
        caption = ["caption", str(pics), "--out", str(tmp_path / f"caps-{tag}.jsonl"), "--workers", "1",
                   "--batch-size", "2", "--beam-size", "2", "--no-progress", "--device", "cpu"]
        return [train, caption]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           str(REPO / "tests" / "torchrun_driver.py"), json.dumps(commands("two"))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the encoder's sums in the same order
    try:
        for argv in commands("one"):
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)

    one, two = ([json.loads(x) for x in (tmp_path / f"run-{t}" / "metrics.jsonl").read_text().splitlines()]
                for t in ("one", "two"))
    assert [h["epoch"] for h in two] == [1, 2]  # one writer: rank 0
    assert [h["train_loss"] for h in two] == pytest.approx([h["train_loss"] for h in one], rel=1e-5)
    assert two[1]["train_loss"] < two[0]["train_loss"]

    names_one, feats_one = read_cache(tmp_path / "cache-one")
    names_two, feats_two = read_cache(tmp_path / "cache-two")
    assert names_one == names_two and len(names_one) == 30
    np.testing.assert_array_equal(feats_one, feats_two)  # sharded extraction = the unsharded cache

    caps_one, caps_two = ({r["image"]: r["caption"] for r in map(json.loads, open(tmp_path / f"caps-{t}.jsonl"))}
                          for t in ("one", "two"))
    assert len(caps_two) == 6 and caps_two == caps_one
    assert not list(tmp_path.glob("caps-two.jsonl.part-rank*"))
