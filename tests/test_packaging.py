"""setup.py installs no top-level `tools`, and a real mmcv in the environment is detected and explained."""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fake_distribution(site_packages: Path, name: str, version: str, top_level: str) -> None:
    """A minimal installed distribution (dist-info with METADATA and top_level.txt), as pip leaves one."""
    info = site_packages / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(top_level + "\n")
    (info / "RECORD").write_text("")


def test_setup_installs_no_top_level_tools_package():
    code = ("from setuptools import setup  # noqa: F401 (installs the distutils shim)\n"
            "from distutils.core import run_setup\n"
            "dist = run_setup('setup.py', stop_after='init')\n"
            "print(sorted(dist.packages))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    packages = eval(proc.stdout.strip().splitlines()[-1])  # a printed list of strings
    assert "mmcv" in packages and "mmcv.models.utils" in packages
    assert not [p for p in packages if p == "tools" or p.startswith("tools.")]


def test_foreign_mmcv_distributions_are_found_and_explained(tmp_path, monkeypatch):
    from mmcv._install_check import clash_message, foreign_distributions
    site = tmp_path / "site"
    fake_distribution(site, "mmcv-full", "1.7.2", "mmcv")
    fake_distribution(site, "orion-kd", "0.1.0", "adzoo\nmmcv\ntools")  # ourselves: never a clash
    fake_distribution(site, "numpy", "1.23.0", "numpy")
    found = foreign_distributions(paths=[str(site)])
    assert [(d.name, d.version) for d in found] == [("mmcv-full", "1.7.2")]
    message = clash_message(found)
    assert "mmcv-full 1.7.2" in message and str(site) in message
    assert "separate virtual environment" in message and "install_into_orion.py" in message
    assert foreign_distributions(paths=[str(tmp_path / "empty")]) == []


def test_importing_the_light_core_next_to_a_real_mmcv_fails_with_the_explanation(tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "mmcv", "2.1.0", "mmcv")
    code = f"import sys; sys.path.append({str(site)!r}); import mmcv"
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "mmcv 2.1.0" in proc.stderr and "shadow" in proc.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="venv layout")
def test_setup_refuses_to_install_next_to_a_real_mmcv(tmp_path):
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    fake_distribution(Path(site), "mmcv-full", "1.7.2", "mmcv")
    proc = subprocess.run([str(python), "setup.py", "--version"], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "mmcv-full 1.7.2" in proc.stderr and "would shadow" in proc.stderr


def test_make_installs_with_the_pinned_versions_the_numbers_were_made_with():
    import importlib.metadata as metadata
    import re

    root = Path(__file__).resolve().parents[1]
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip()).groups()
            pins[name.lower().replace("_", "-")] = version
    makefile = (root / "Makefile").read_text()
    assert makefile.count("-c $(CONSTRAINTS)") == 2 and "CONSTRAINTS := constraints.txt" in makefile
    needed = ["torch", "mmengine", "transformers", "numpy", "safetensors", "matplotlib", "tqdm", "pytest",
              "pytest-xdist", "vermin", "onnx", "onnxruntime", "nbclient", "nbformat", "ipykernel"]
    assert not [name for name in needed if name not in pins]
    for name in ("torch", "numpy", "transformers"):  # what the shipped metrics depend on
        assert metadata.version(name).split("+")[0] == pins[name], name
