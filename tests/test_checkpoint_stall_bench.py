"""benchmarks/checkpoint_stall.py on CPU (jrt-tiny over two gloo processes): it runs the real
trainer with background saves, and its table has a row per timed save with the split of the
stall (the benchmark once broke silently when the trainer's saver moved behind the engine)."""
import re
import subprocess
import sys

from tests.runs import REPO, env


def test_the_stall_benchmark_times_every_background_save(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "benchmarks/checkpoint_stall.py", "--preset", "jrt-tiny", "--micro-batch", "2",
         "--seq-length", "64", "--steps", "7", "--save-interval", "3", "--warmup", "1",
         "--modes", "async", "--save-dir", str(tmp_path / "saves")],
        cwd=REPO, env=env(master_port=False), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # mode, step, stall (the step's time over the median step), capture, of it state dicts
    rows = re.findall(r"^async\s+(\d+)\s+-?[\d.]+\s+([\d.]+)\s+([\d.]+)\s", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == [3, 6], proc.stdout
    for _, capture, state_dicts in rows:
        assert 0 < float(state_dicts) <= float(capture)
    assert "DP=2, distributed optimizer" in proc.stdout and "target: stall <= 2 s" in proc.stdout
    assert not any((tmp_path / "saves").iterdir())  # emptied after the run
