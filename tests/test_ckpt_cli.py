"""jrt-ckpt: inspect and verify a checkpoint or a save_dir, as a console script, a module and a file.

One 4-step run of configs/mock-tiny.yaml (checkpoints at steps 2 and 4) serves every test.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints_tools import cli
from tests.multiproc import launch
from tests.runs import REPO, run_in_process



@pytest.fixture(scope="module")
def save_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ckpt_cli") / "run"
    launch(run_in_process, 1, run_dir, in_process=True)
    return run_dir / "ckpt"


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_inspect_run_as_a_file_reports_the_newest_checkpoint_without_megatron_warnings(save_dir):
    result = _tool(sys.executable, str(REPO / "checkpoints_tools" / "cli.py"), "inspect",
                   str(save_dir), "--tensors", "2")
    assert result.returncode == 0, result.stderr
    for text in (f"checkpoint: {save_dir / 'step_0000004'}", "step: 4", "consumed samples: 16",
                 "consumed tokens: 1024", "layout: TP=1 PP=1 DP=1", "  model.hidden_size: 64",
                 "decoder.layers.0", "more (--tensors 0 lists all)",
                 "verified: ok (sizes and sha256)"):
        assert text in result.stdout, (text, result.stdout)
    # megatron-core's import-time warnings (no Apex, no Transformer Engine...) are not shown.
    assert result.stderr == ""


def test_jrt_ckpt_verify_is_installed_and_prints_one_line(save_dir):
    jrt_ckpt = shutil.which("jrt-ckpt")
    assert jrt_ckpt, "jrt-ckpt is not on PATH: pip install --no-deps -e ."
    result = _tool(jrt_ckpt, "verify", str(save_dir / "step_0000002"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"verified: ok (sizes and sha256): {save_dir / 'step_0000002'}, step 2, 6 files"]
    assert result.stderr == ""
    usage = _tool(sys.executable, "-m", "checkpoints_tools.cli", "--help")
    assert usage.returncode == 0 and "inspect" in usage.stdout and "verify" in usage.stdout


def test_damaged_checkpoint_is_named_and_a_save_dir_falls_back_warning_once(save_dir, tmp_path,
                                                                              capsys):
    copy = tmp_path / "ckpt"
    shutil.copytree(save_dir, copy)
    shard = sorted((copy / "step_0000004").glob("*.distcp"))[0]
    flipped = bytearray(shard.read_bytes())
    flipped[len(flipped) // 3] ^= 0xFF  # same size: only sha256 catches it
    shard.write_bytes(bytes(flipped))
    capsys.readouterr()

    assert cli.main(["verify", str(shard.parent)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"verified: FAILED: {shard}: sha256") and out.count("\n") == 1, out

    assert cli.main(["inspect", str(shard.parent), "--no-hash", "--tensors", "1"]) == 0
    assert "verified: ok (sizes only)" in capsys.readouterr().out

    for command in (["verify", str(copy)], ["inspect", str(copy), "--tensors", "1"]):
        assert cli.main(command) == 0
        captured = capsys.readouterr()
        assert str(copy / "step_0000002") in captured.out and "step 4" not in captured.out
        warnings = captured.err.splitlines()
        assert len(warnings) == 1 and shard.name in warnings[0], captured.err
        assert warnings[0].startswith("jrt-ckpt: warning: skipping checkpoint")
