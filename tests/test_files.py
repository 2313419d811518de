"""The one atomic writer's leftovers: a killed writer's temp files are swept, a live one's kept."""
import os
import subprocess
import sys

from captioner.files import remove_stale_temps_in


def test_a_run_folder_sweep_removes_only_dead_writers_temps(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # that process has exited
    (tmp_path / "curves.png").write_bytes(b"png")
    stale = [tmp_path / f"curves.png.{dead_pid}.x1y2.tmp", tmp_path / f"last.pt.{dead_pid}.abcd.tmp"]
    live = tmp_path / f"metrics.jsonl.{os.getpid()}.zz9.tmp"
    for p in (*stale, live):
        p.write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not a writer's temp")
    removed = remove_stale_temps_in(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert live.exists() and (tmp_path / "curves.png").exists() and (tmp_path / "notes.tmp").exists()
    assert remove_stale_temps_in(tmp_path / "missing") == []
