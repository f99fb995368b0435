"""A regular (non-editable) install ships the configs and the demo finds its config in it."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))

# Left out of the copy that is built: run outputs, caches and earlier builds.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", "runs", "outputs", "build", "*.egg-info",
                                     "__pycache__", ".pytest_cache")


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of a copy of the repository (the build writes build/ and egg-info beside it)."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=120)
    return next((tmp_path / "dist").glob("megatron_jrt-*.whl"))


def test_wheel_ships_the_configs_and_the_installed_demo_finds_its_config(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "demo.yaml" in CONFIGS
    for config in CONFIGS:
        assert f"megatron_jrt/configs/{config}" in names, (config, names)

    target = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    # Outside the repository, with the installed copy first on the path.
    probe = ("import json, yaml; from megatron_jrt.demo import CONFIG; "
             "print(json.dumps([str(CONFIG), yaml.safe_load(CONFIG.read_text())]))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    path, config = json.loads(result.stdout)
    assert Path(path) == target / "megatron_jrt" / "configs" / "demo.yaml"
    assert {"model", "data", "training"} <= set(config), config
