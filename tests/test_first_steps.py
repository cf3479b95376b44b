"""A newcomer's first commands: one line with the fix for a missing torch / mmengine, the launcher's
interpreter, no TensorBoard warning, every kd_config key settable from the command line, a damaged
shipped teacher reported in one line."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import dependency_check

ROOT = Path(__file__).resolve().parents[1]
TINY_KD_CONFIG = ROOT / "adzoo" / "orion" / "configs" / "orion_tiny_kd_train.py"


def _entry_points():
    """Every script of the repository with a command line (a ``__main__`` block)."""
    candidates = [ROOT / "demo_kd_50_pruning.py", *sorted((ROOT / "tools").rglob("*.py")),
                  *sorted((ROOT / "adzoo").rglob("*.py"))]
    return [str(p.relative_to(ROOT)) for p in candidates if 'if __name__ == "__main__"' in p.read_text()]


def _run_without_site_packages(*args: str) -> subprocess.CompletedProcess:
    """This interpreter with ``-S``: the standard library only, as a Python without the venv's packages."""
    return subprocess.run([sys.executable, "-S", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def _assert_one_line_with_the_fix(proc: subprocess.CompletedProcess, entry: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == dependency_check.MISSING_DEPENDENCY_EXIT, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {entry} needs torch") and (".venv" in lines[0] or "make setup" in lines[0])


@pytest.mark.parametrize("entry", _entry_points())
def test_every_entry_point_without_torch_says_so_in_one_line(entry):
    proc = _run_without_site_packages(entry, "--help")
    if proc.returncode == 0:  # an entry point that needs no torch for --help (the installer, the demo's parser)
        assert "Traceback" not in proc.stderr
    else:
        _assert_one_line_with_the_fix(proc, entry)


def test_the_demo_pipeline_without_torch_says_so_in_one_line():
    _assert_one_line_with_the_fix(_run_without_site_packages("demo_kd_50_pruning.py"), "demo_kd_50_pruning.py")


def _fake_checkout(tmp_path: Path, light_core: bool, venv: bool) -> Path:
    (tmp_path / "mmcv").mkdir()
    if light_core:
        (tmp_path / "mmcv" / "_install_check.py").write_text("")
    if venv:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / ".venv" / "bin" / "python").write_text("")
    return tmp_path


def _without(monkeypatch, missing: str) -> None:
    real = dependency_check.importlib.util.find_spec
    monkeypatch.setattr(dependency_check.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))


def test_missing_mmengine_is_reported_next_to_the_light_core(tmp_path, monkeypatch, capsys):
    root = _fake_checkout(tmp_path, light_core=True, venv=True)
    _without(monkeypatch, "mmengine")
    with pytest.raises(SystemExit) as exit_info:
        dependency_check.require_dependencies(str(root / "tools" / "x.py"), root=root)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: tools/x.py needs mmengine,") and "source .venv/bin/activate" in err


def test_mmengine_is_not_required_in_an_orion_checkout(tmp_path, monkeypatch):
    root = _fake_checkout(tmp_path, light_core=False, venv=False)
    _without(monkeypatch, "mmengine")
    dependency_check.require_dependencies("demo_kd_50_pruning.py", root=root)  # ORION's mmcv needs no mmengine
    assert "ORION runs in" in dependency_check.environment_fix(root)


def test_without_a_venv_the_fix_is_make_setup(tmp_path):
    assert "make setup" in dependency_check.environment_fix(_fake_checkout(tmp_path, light_core=True, venv=False))


# --------------------------------------------------------------------------- the launcher's interpreter

def _launcher_checkout(tmp_path: Path) -> Path:
    """A copy of the launcher whose .venv/bin/python only reports that it ran."""
    launcher = tmp_path / "adzoo" / "orion" / "orion_dist_train.sh"
    launcher.parent.mkdir(parents=True)
    shutil.copy(ROOT / "adzoo" / "orion" / "orion_dist_train.sh", launcher)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho \"venv python ran\"\n")
    python.chmod(0o755)
    (tmp_path / "cfg.py").write_text("")
    return launcher


def test_the_launcher_uses_the_repositorys_venv_unless_python_is_set(tmp_path):
    launcher = _launcher_checkout(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", str(launcher), "cfg.py", "1"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "venv python ran" in proc.stdout
    assert f"python {tmp_path}/.venv/bin/python" in proc.stdout
    other = tmp_path / "other_python"
    other.write_text("#!/bin/sh\necho \"PYTHON= ran\"\n")
    other.chmod(0o755)
    proc = subprocess.run(["bash", str(launcher), "cfg.py", "1"], cwd=tmp_path, env=dict(env, PYTHON=str(other)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "PYTHON= ran" in proc.stdout and "venv python ran" not in proc.stdout


def test_the_launchers_usage_says_how_to_choose_the_interpreter():
    proc = subprocess.run(["bash", "adzoo/orion/orion_dist_train.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "PYTHON" in proc.stderr and ".venv/bin/python" in proc.stderr


def test_the_launcher_under_a_python_without_torch_says_so_in_one_line(tmp_path):
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    proc = subprocess.run(["bash", "adzoo/orion/orion_dist_train.sh", str(TINY_KD_CONFIG.relative_to(ROOT)), "1",
                           "--work-dir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=str(python)), timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    assert "error: adzoo/orion/launch.py needs torch" in out


# --------------------------------------------------------------------------- configs and the command line

@pytest.mark.parametrize("name", ["orion_tiny_train.py", "orion_tiny_kd_train.py", "orion_tiny_kd_joint.py"])
def test_tensorboard_is_configured_only_where_it_is_installed(name):
    from mmcv import Config

    hooks = Config.fromfile(str(ROOT / "adzoo" / "orion" / "configs" / name)).log_config["hooks"]
    if any(h["type"] == "TensorboardLoggerHook" for h in hooks):
        import importlib.util
        assert importlib.util.find_spec("tensorboard") is not None, f"{name} logs to TensorBoard, not installed"


SAMPLE_VALUES = dict(teacher_backbone_path="ckpt/other.pth", distillation_alpha=0.5, warmup_epochs=2,
                     warmup_iters=10, pruning_ratio=0.5, mlp_pruning_ratio=0.25, head_selection="magnitude",
                     teacher_dtype="bf16", label_fraction=0.1, block_map={3: 2})


def test_every_documented_kd_config_key_can_be_set_on_the_tiny_config():
    from adzoo.orion.train_kd import merge_cfg_options
    from mmcv import Config
    from mmcv.models.utils.kd_config import KD_CONFIG_KEYS

    for key, default in KD_CONFIG_KEYS.items():
        cfg = Config.fromfile(str(TINY_KD_CONFIG))
        value = SAMPLE_VALUES.get(key, default)
        merge_cfg_options(cfg, {f"model.kd_config.{key}": value})
        assert cfg.model.kd_config[key] == value, key


def test_a_kd_config_typo_is_still_refused_in_one_line():
    from adzoo.orion.train_kd import merge_cfg_options
    from mmcv import Config
    from mmcv.models.utils.user_errors import UserError

    cfg = Config.fromfile(str(TINY_KD_CONFIG))
    with pytest.raises(UserError) as err:
        merge_cfg_options(cfg, {"model.kd_config.label_fracton": 0.1})
    message = str(err.value)
    assert "\n" not in message and "unknown key 'label_fracton'" in message and "label_fraction" in message
    with pytest.raises(UserError, match="another type"):
        merge_cfg_options(cfg, {"model.kd_config.label_fraction": "all"})


def test_materialize_with_a_damaged_shipped_teacher_is_one_line(tmp_path, monkeypatch, capsys):
    import tools.tiny_teacher_asset as asset
    import tools.train_tiny_teacher as ttt

    monkeypatch.setattr(asset, "file_sha256", lambda path: "0" * 64)  # the shipped file no longer matches
    monkeypatch.setattr(ttt, "MATERIALIZED_CHECKPOINT", tmp_path / "orion_tiny.pth")
    assert ttt.main(["--materialize"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "does not match" in err and "git checkout" in err
    assert not (tmp_path / "orion_tiny.pth").exists()
