"""A Ctrl-C during an entry point's start-up imports is exit 130 and one line, not a traceback.

Each case runs the entry point in a fresh interpreter the way a user starts it (the console script's
`from MODULE import main; sys.exit(main())`, or `python -m MODULE`) with a test-only import hook that
sends SIGINT to the process at the moment one chosen module is first imported: the signal lands
inside the start-up imports every time, where a real Ctrl-C lands by chance (the interrupt tests of
tests/test_data_prep_cli.py hit it now and then). Nothing in the entry points knows about the hook.
"""
import importlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# SIGINT to this process when TARGET is first imported. With CONVERT, the exception the handler raises
# comes out of the import as an ImportError, as it does from an extension module (numpy's C-API import
# of datetime turned jrt-prep's interrupt into "error: ... PyCapsule_Import could not import ...").
_HOOK = textwrap.dedent("""
    import os, signal, sys, time

    class SigintOnImport:
        def find_spec(self, name, path=None, target=None):
            if name != TARGET:
                return None
            sys.meta_path.remove(self)
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler runs here
            except BaseException as e:
                if CONVERT:
                    raise ImportError("an extension module failed to import") from e
                raise
            return None

    sys.meta_path.insert(0, SigintOnImport())
""")


def _start_up_interrupted(module: str, prog: str, argv: list[str], target: str, *, as_module: bool,
                          convert: bool = False) -> tuple[int, str]:
    """(exit code, stderr) of the entry point `module`:main run as `prog ARGV` (or `python -m module
    ARGV`), with SIGINT at the first import of `target`."""
    if as_module:
        run = f"import runpy; sys.argv = [{module!r}, *ARGV]; runpy.run_module({module!r}, run_name='__main__')"
    else:  # what pip's console script does; its argv[0] is the script's path
        run = f"sys.argv = ['/venv/bin/{prog}', *ARGV]; from {module} import main; sys.exit(main())"
    code = f"TARGET, CONVERT, ARGV = {target!r}, {convert!r}, {argv!r}\n{_HOOK}\n{run}\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def _assert_one_line(rc: int, err: str, line_start: str) -> str:
    assert rc == 130, (rc, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line_start), err
    return lines[0]


# ---------------------------------------------------------------- jrt-prep

@pytest.mark.parametrize("as_module", [False, True], ids=["jrt-prep", "python-m"])
def test_jrt_prep_ctrl_c_while_importing_its_modules(tmp_path, as_module):
    """Before the arguments are parsed (data_prep.documents gives the --split-text choices) and after
    (the shard writer): exit 130, one line, no output folder."""
    out = tmp_path / "out"
    argv = ["shards", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tmp_path / "t.model"),
            "--out", str(out)]
    rc, err = _start_up_interrupted("data_prep.cli", "jrt-prep", argv, "data_prep.documents", as_module=as_module)
    assert _assert_one_line(rc, err, "jrt-prep") == "jrt-prep: interrupted (SIGINT)"

    rc, err = _start_up_interrupted("data_prep.cli", "jrt-prep", argv, "data_prep.shards", as_module=as_module)
    _assert_one_line(rc, err, "jrt-prep shards: interrupted (SIGINT); nothing published")
    assert not out.exists()


def test_jrt_prep_ctrl_c_that_an_extension_import_turns_into_an_import_error(tmp_path):
    rc, err = _start_up_interrupted("data_prep.cli", "jrt-prep", ["verify", "--data", str(tmp_path)],
                                    "data_prep.reader", as_module=False, convert=True)
    assert _assert_one_line(rc, err, "jrt-prep") == "jrt-prep verify: interrupted (SIGINT)"


def test_jrt_prep_import_error_without_a_signal_is_still_an_error(capsys, monkeypatch):
    """The other side of the ImportError rule: a broken install stays a one-line error (exit 2)."""
    from data_prep import cli

    def broken(args):
        raise ImportError("No module named 'sentencepiece'")

    monkeypatch.setattr(cli, "cmd_verify", broken)
    assert cli.main(["verify", "--data", "x"]) == 2
    assert capsys.readouterr().err.strip() == "jrt-prep verify: error: No module named 'sentencepiece'"


# ---------------------------------------------------------------- jrt-train, jrt-convert, jrt-eval

@pytest.mark.parametrize("module, prog, argv, target", [
    ("megatron_jrt.train", "jrt-train", ["--config", "configs/demo.yaml"], "torch"),
    ("checkpoints_tools.convert", "jrt-convert", ["to-hf", "ckpt", "out"], "torch"),
    ("megatron_jrt.evals.cli", "jrt-eval", ["synthetic", "--help"], "megatron_jrt.checkpoint"),
])
@pytest.mark.parametrize("as_module", [False, True], ids=["script", "python-m"])
def test_ctrl_c_during_the_start_up_imports_is_exit_130_in_one_line(module, prog, argv, target, as_module):
    rc, err = _start_up_interrupted(module, prog, argv, target, as_module=as_module)
    _assert_one_line(rc, err, f"{prog}: interrupted (SIGINT)")


def test_importing_an_entry_module_changes_no_signal_handler():
    """The start-up handler is the program's only: a test or a notebook importing the module keeps its own."""
    before = signal.getsignal(signal.SIGINT)
    importlib.import_module("checkpoints_tools.convert")
    importlib.import_module("megatron_jrt.train")

    assert signal.getsignal(signal.SIGINT) is before
