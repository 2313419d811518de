"""benchmarks/scale.py: its quote in docs/results.md, and that a load on the machine is said out loud."""

from conftest import REPO, load_benchmark


def result(load: float) -> dict:
    caption = [{"processes": p, "loading_workers": w, "images_per_second": ips, "images": 64, "wall_seconds": 9}
               for p, w, ips in ((1, 1, 10.0), (1, 2, 12.5), (2, 1, 16.0))]
    return {"settings": {"images": 64, "batch_size": 16, "train_images": 64, "epochs": 1},
            "machine": {"cpus": 2}, "load_average_before": [load, 0, 0], "load_average_after": [load, 0, 0],
            "under_load": load > 1.0, "captioning": caption,
            "training": {"one": {"mean_epoch_seconds": 30.0}, "two": {"mean_epoch_seconds": 20.0}, "speedup": 1.5}}


def test_readme_block_quotes_the_numbers_and_flags_a_busy_machine():
    bench = load_benchmark("scale")
    idle = bench.readme_block(result(0.1))
    assert "| 1 process, 2 loading worker(s) | 12.5 | 1.25x |" in idle
    assert "| 2 processes (torchrun), 1 loading worker each | 16.0 | 1.60x |" in idle
    assert "**1.5x**" in idle and "not representative" not in idle
    assert "| **1.5x** |\n\n64 generated" in idle  # a blank line ends the table
    assert "not representative" in bench.readme_block(result(4.0))
    assert bench.loaded(0.6, [0.1], 2) and not bench.loaded(0.1, [3.0], 2)  # other processes' CPU decides
    assert bench.loaded(None, [3.0], 2) and not bench.loaded(None, [0.5], 2)  # else the load before the run
    assert "other processes used 0.60 cores" in bench.readme_block({**result(4.0), "other_processes_cores": 0.6})
    readme = (REPO / "docs" / "results.md").read_text()
    assert readme.index(bench.MARKERS[0]) < readme.index(bench.MARKERS[1])


def test_other_processes_cpu_is_what_the_machine_used_beyond_this_process():
    bench = load_benchmark("scale")
    start = bench.cpu_seconds()
    if start is None:
        return  # not Linux: the load average is used instead
    while bench.cpu_seconds()[1] - start[1] < 0.3:  # spend 0.3 s of this process's own CPU
        sum(i * i for i in range(10_000))
    end = bench.cpu_seconds()
    # the machine's total includes this process's share (to the clock tick)
    assert end[0] - start[0] >= (end[1] - start[1]) - 0.05
    assert bench.other_cores((10.0, 1.0), (13.0, 2.0), 4.0) == 0.5  # 3 s used, 1 s of it ours, over 4 s


def test_generated_photos_are_real_jpegs(tmp_path):
    from PIL import Image

    made = load_benchmark("scale").make_photos(tmp_path, 3)
    assert [m[0] for m in made] == sorted(p.name for p in tmp_path.iterdir())
    with Image.open(tmp_path / made[0][0]) as im:
        assert im.format == "JPEG" and im.size == (500, 375)
