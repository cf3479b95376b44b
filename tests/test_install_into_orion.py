"""The ORION overlay installer against a fake ORION checkout built in a temporary folder.

The fake ORION has its own ``mmcv`` package (an mmcv-1.x-like registry that
refuses duplicate names, ``build_model``, ``mmcv.utils``) and an ``Orion``
detector honouring ORION's contract in miniature. Code that imports the fake
``mmcv`` runs in a subprocess so it never meets this repository's ``mmcv``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools import install_into_orion as inst  # noqa: E402
from tools import plugin_manifest as manifest  # noqa: E402
from tests.fake_orion_checkout import (make_fake_orion, make_fake_source,  # noqa: E402
                                       tree_snapshot, write_tree)

PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python")

def run_in(root: Path, code: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python`` in ``root`` (no bytecode written)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([python, "-B", "-c", textwrap.dedent(code)], cwd=str(root), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def run_cli(args: Iterable[str], python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run the installer script as a user would."""
    return subprocess.run([python, "-B", str(REPO_ROOT / "tools/install_into_orion.py")] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


@pytest.fixture()
def orion(tmp_path: Path) -> Path:
    return make_fake_orion(tmp_path)


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    return make_fake_source(tmp_path)


# ----------------------------------------------------------------------------- tests
def test_fake_orion_registry_builds_orion_and_refuses_duplicates(orion: Path) -> None:
    proc = run_in(orion, """
        import torch
        from mmcv.models.builder import MODELS, build_model
        from mmcv.models.detectors.orion import Orion
        model = build_model(dict(type='Orion', img_backbone=dict(type='FakeViT'),
                                 pts_bbox_head=dict(type='FakeHead'), map_head=dict(type='FakeHead'),
                                 lm_head=dict(type='FakeHead', out_channels=5), use_grid_mask=True))
        data = dict(img=torch.randn(2, 3, 3, 16, 16), img_metas=[{}, {}],
                    gt_labels=torch.tensor([0, 2]), map_targets=torch.zeros(2, 3))
        out = model(data, return_loss=True)
        assert set(out) == {'loss', 'log_vars', 'num_samples'} and out['num_samples'] == 2
        assert abs(out['log_vars']['loss'] - sum(v for k, v in out['log_vars'].items() if k != 'loss')) < 1e-5
        try:
            MODELS.register_module(module=Orion)
        except KeyError:
            print('duplicate refused')
        """)
    assert proc.returncode == 0, proc.stderr
    assert "duplicate refused" in proc.stdout


def test_install_copies_every_manifest_file_and_records_sha256(orion: Path, source: Path) -> None:
    record = inst.install(orion, source_root=source)
    assert sorted(record["files"]) == sorted(manifest.PLUGIN_FILES)
    on_disk = json.loads((orion / manifest.RECORD_NAME).read_text())
    assert on_disk == record
    for rel in manifest.PLUGIN_FILES:
        assert (orion / rel).read_bytes() == (source / rel).read_bytes()
        assert record["files"][rel] == {"sha256": hashlib.sha256((source / rel).read_bytes()).hexdigest()}
    # folders that ORION lacked are recorded, shallow first; ORION's own folders are not
    assert record["created_dirs"] == ["mmcv/models/losses", "tools", "tools/head_pruning"]
    assert not list(orion.glob("**/*.tmp"))


def test_plain_install_beside_orions_launcher_changes_no_existing_file(orion: Path, source: Path) -> None:
    before = tree_snapshot(orion)
    assert "adzoo/orion/orion_dist_train.sh" in before and "adzoo/orion/train.py" in before
    inst.install(orion, source_root=source)
    after = tree_snapshot(orion)
    assert {rel: after.get(rel) for rel in before} == before  # every existing file and folder unchanged
    added = sorted(os.path.normpath(rel) for rel in after if rel not in before and not rel.endswith("/"))
    assert added == sorted([manifest.RECORD_NAME] + list(manifest.PLUGIN_FILES))
    assert inst.uninstall(orion) == []
    assert tree_snapshot(orion) == before


def test_manifest_ships_no_standalone_runner_or_launcher() -> None:
    for rel in ("adzoo/orion/orion_dist_train.sh", "adzoo/orion/train_kd.py", "adzoo/orion/apis/kd_loop.py"):
        assert rel not in manifest.PLUGIN_FILES
    assert "mmcv/runner/hooks/kd_hooks.py" in manifest.PLUGIN_FILES
    assert manifest.registry_of("mmcv.runner.hooks.kd_hooks") == "mmcv.runner.hooks:HOOKS"


def test_import_check_registers_plugin_types_without_touching_the_tree(orion: Path, source: Path) -> None:
    inst.install(orion, source_root=source)
    before = tree_snapshot(orion)
    version = inst.check_imports(orion, python=sys.executable)
    assert version == "{}.{}.{}".format(*sys.version_info[:3])
    assert tree_snapshot(orion) == before  # no __pycache__ left behind


def test_import_check_names_types_that_did_not_register(orion: Path, source: Path) -> None:
    (source / "mmcv/models/losses/kd_losses.py").write_text("X = 1\n")
    inst.install(orion, source_root=source)
    with pytest.raises(inst.InstallError, match=r"CombinedKDLoss \(in mmcv.models.builder:MODELS\) not registered"):
        inst.check_imports(orion, python=sys.executable)


def test_import_check_reports_the_import_error(orion: Path, source: Path) -> None:
    (source / "mmcv/models/losses/kd_losses.py").write_text("import mmengine_missing_module\n")
    inst.install(orion, source_root=source)
    with pytest.raises(inst.InstallError, match="does not import.*\n(.|\n)*mmengine_missing_module"):
        inst.check_imports(orion, python=sys.executable)


def test_refuses_existing_paths_listing_every_conflict_and_writes_nothing(orion: Path, source: Path) -> None:
    write_tree(orion, {"mmcv/models/losses/kd_losses.py": "# someone's own\n",
                       "tools/head_pruning_utils.py": "# theirs\n"})
    before = tree_snapshot(orion)
    for dry_run in (False, True):
        with pytest.raises(inst.InstallError) as err:
            inst.install(orion, source_root=source, dry_run=dry_run)
        message = str(err.value)
        assert "mmcv/models/losses/kd_losses.py (ORION's file)" in message
        assert "tools/head_pruning_utils.py (ORION's file)" in message
        assert "only adds files and never replaces one" in message and "Nothing was written" in message
        assert tree_snapshot(orion) == before


def test_dry_run_changes_nothing(orion: Path, source: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree_snapshot(orion)
    inst.install(orion, source_root=source, dry_run=True)
    out = capsys.readouterr().out
    assert "mmcv/models/detectors/orion_student.py" in out and "mkdir" in out and "nothing changed" in out
    assert tree_snapshot(orion) == before
    inst.install(orion, source_root=source)
    installed = tree_snapshot(orion)
    inst.uninstall(orion, dry_run=True)
    assert tree_snapshot(orion) == installed


def test_uninstall_leaves_the_tree_byte_identical(orion: Path, source: Path) -> None:
    before = tree_snapshot(orion)
    inst.install(orion, source_root=source)
    inst.check_imports(orion, python=sys.executable)
    assert tree_snapshot(orion) != before
    assert inst.uninstall(orion) == []
    assert tree_snapshot(orion) == before


def test_uninstall_removes_bytecode_of_removed_modules(orion: Path, source: Path) -> None:
    before = tree_snapshot(orion)
    inst.install(orion, source_root=source)
    cache = orion / "mmcv/models/backbones/__pycache__"
    cache.mkdir()
    (cache / "eva_vit_student.cpython-38.pyc").write_bytes(b"stale")
    inst.uninstall(orion)
    assert tree_snapshot(orion) == before


def test_reinstall_updates_its_own_unedited_files(orion: Path, source: Path) -> None:
    inst.install(orion, source_root=source)
    (source / "tools/head_pruning_utils.py").write_text("# version 2\n")
    record = inst.install(orion, source_root=source)
    assert (orion / "tools/head_pruning_utils.py").read_text() == "# version 2\n"
    assert record["files"]["tools/head_pruning_utils.py"]["sha256"] == \
        hashlib.sha256(b"# version 2\n").hexdigest()


def test_edited_installed_file_blocks_reinstall_and_is_kept_by_uninstall(orion: Path, source: Path) -> None:
    before = tree_snapshot(orion)
    inst.install(orion, source_root=source)
    edited = orion / "adzoo/orion/configs/orion_stage3_kd_train.py"
    edited.write_text("# my local paths\n")
    with pytest.raises(inst.InstallError, match="orion_stage3_kd_train.py \\(installed by ORION-KD, edited since\\)"):
        inst.install(orion, source_root=source)
    assert inst.uninstall(orion) == ["adzoo/orion/configs/orion_stage3_kd_train.py"]
    assert edited.read_text() == "# my local paths\n"
    assert list(json.loads((orion / manifest.RECORD_NAME).read_text())["files"]) == \
        ["adzoo/orion/configs/orion_stage3_kd_train.py"]
    edited.unlink()  # the user deletes it by hand, then uninstalls again
    assert inst.uninstall(orion) == []
    assert tree_snapshot(orion) == before


def test_rejects_a_target_that_is_not_orion(tmp_path: Path, source: Path) -> None:
    (tmp_path / "notorion" / "adzoo").mkdir(parents=True)
    with pytest.raises(inst.InstallError, match="mmcv/models/builder.py"):
        inst.install(tmp_path / "notorion", source_root=source)
    with pytest.raises(inst.InstallError, match="not a folder"):
        inst.install(tmp_path / "missing", source_root=source)


def test_missing_plugin_source_is_a_clear_error(orion: Path, source: Path) -> None:
    (source / "mmcv/models/losses/kd_losses.py").unlink()
    before = tree_snapshot(orion)
    with pytest.raises(inst.InstallError, match="missing.*mmcv/models/losses/kd_losses.py"):
        inst.install(orion, source_root=source)
    assert tree_snapshot(orion) == before


def test_uninstall_without_record_is_a_clear_error(orion: Path) -> None:
    with pytest.raises(inst.InstallError, match="nothing to uninstall"):
        inst.uninstall(orion)


def test_custom_imports_line_lists_the_manifest_modules() -> None:
    line = manifest.custom_imports_line()
    scope: dict = {}
    exec(line, {"dict": dict}, scope)
    assert scope["custom_imports"] == dict(imports=list(manifest.CUSTOM_IMPORTS), allow_failed_imports=False)


@pytest.mark.parametrize("python", [sys.executable, str(PY38)], ids=["venv", "python3.8"])
def test_cli_installs_checks_imports_and_uninstalls(orion: Path, source: Path, python: str) -> None:
    if not Path(python).exists():
        pytest.skip("{} not available".format(python))
    before = tree_snapshot(orion)
    proc = run_cli([str(orion), "--source", str(source), "--python", sys.executable], python=python)
    assert proc.returncode == 0, proc.stderr
    assert "import check ok" in proc.stdout
    assert manifest.custom_imports_line() in proc.stdout
    not_orion = run_cli([str(orion / "mmcv"), "--source", str(source)], python=python)
    assert not_orion.returncode == 2 and not_orion.stderr.startswith("error: ")
    assert "Traceback" not in not_orion.stderr
    proc = run_cli([str(orion), "--uninstall"], python=python)
    assert proc.returncode == 0, proc.stderr
    assert tree_snapshot(orion) == before


def test_cli_reports_conflicts_in_one_error_with_exit_status_2(orion: Path, source: Path) -> None:
    write_tree(orion, {"mmcv/models/losses/kd_losses.py": "# ORION's\n", "tools/kd_setup_check.py": "# x\n"})
    before = tree_snapshot(orion)
    proc = run_cli([str(orion), "--source", str(source), "--skip-import-check"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr
    assert "mmcv/models/losses/kd_losses.py" in proc.stderr and "tools/kd_setup_check.py" in proc.stderr
    assert tree_snapshot(orion) == before


def test_no_option_replaces_a_file(orion: Path, source: Path) -> None:
    proc = run_cli([str(orion), "--source", str(source), "--force"])
    assert proc.returncode == 2 and "unrecognized arguments: --force" in proc.stderr


TINY_EVA = dict(type="EVAViTStudent", img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4,
                teacher_num_heads=4)
TINY_HEADS = dict(pts_bbox_head=dict(type="FakeHead", in_channels=32), map_head=dict(type="FakeHead", in_channels=32),
                  lm_head=dict(type="FakeHead", in_channels=32, out_channels=5))
# Builds ORION's Orion with the plugin backbone, runs a loss step and saves it as a teacher checkpoint.
TEACHER_SCRIPT = """
import sys
import torch
from mmcv.utils import import_modules_from_strings
import_modules_from_strings(['mmcv.models.backbones.eva_vit_student'])
from mmcv.models.builder import build_model
torch.manual_seed(0)
teacher = build_model(dict(type='Orion', img_backbone=%r, use_grid_mask=True, **%r))
data = dict(img=torch.randn(2, 2, 3, 32, 32), img_metas=[{}, {}], gt_labels=torch.tensor([1, 0]),
            map_targets=torch.zeros(2, 3))
out = teacher(data, return_loss=True)
out['loss'].backward()
assert torch.isfinite(out['loss']) and teacher.img_backbone.patch_embed.proj.weight.grad is not None
torch.save(dict(meta={}, state_dict=teacher.state_dict()), sys.argv[1])
print('teacher ok')
""" % (TINY_EVA, TINY_HEADS)


def run_script(root: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """Run a script file (argv after it) with this interpreter in ``root``, without bytecode."""
    script = root.parent / "script.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-B", str(script)] + list(args), cwd=str(root), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


@pytest.mark.skipif(not (REPO_ROOT / "mmcv/models/backbones/eva_vit_student.py").exists(),
                    reason="EVAViTStudent (mmcv/models/backbones/eva_vit_student.py) not written yet")
def test_real_backbone_plugin_runs_inside_orions_detector(orion: Path, tmp_path: Path) -> None:
    before = tree_snapshot(orion)
    # the backbone and its helpers, without the detector, the losses or the hooks
    files = [rel for rel in manifest.PLUGIN_FILES if rel.startswith(("mmcv/models/utils/", "mmcv/models/backbones/"))]
    inst.install(orion, source_root=REPO_ROOT, files=files)
    inst.check_imports(orion, python=sys.executable, modules=["mmcv.models.backbones.eva_vit_student"])
    proc = run_script(orion, TEACHER_SCRIPT, str(tmp_path / "teacher.pth"))
    assert proc.returncode == 0, proc.stderr
    assert "teacher ok" in proc.stdout
    inst.uninstall(orion)
    assert tree_snapshot(orion) == before


def test_real_plugin_builds_orion_student_in_fake_orion(orion: Path, tmp_path: Path) -> None:
    files = [rel for rel in manifest.PLUGIN_FILES if (REPO_ROOT / rel).exists()]
    inst.install(orion, source_root=REPO_ROOT, files=files)
    inst.check_imports(orion, python=sys.executable)
    teacher = run_script(orion, TEACHER_SCRIPT, str(tmp_path / "teacher.pth"))
    assert teacher.returncode == 0, teacher.stderr
    proc = run_script(orion, """
import sys
import torch
from mmcv.utils import import_modules_from_strings
import_modules_from_strings(%r)
from mmcv.models.builder import build_model
from mmcv.models.detectors.orion import Orion
model = build_model(dict(type='OrionStudent', teacher_backbone_path=sys.argv[1], freeze_non_backbone=True,
                         kd_config=dict(alpha_schedule='step', warmup_alpha=0.8, finetune_alpha=0.6,
                                        warmup_epochs=1, pruning_ratio=0.5, head_selection='magnitude'),
                         img_backbone=dict(%r, num_heads=2), use_grid_mask=True, **%r))
assert isinstance(model, Orion), type(model).__mro__
model.train()
data = dict(img=torch.randn(1, 2, 3, 32, 32), img_metas=[{}], gt_labels=torch.tensor([1]),
            map_targets=torch.zeros(1, 3))
out = model(data, return_loss=True)
out['loss'].backward()
assert torch.isfinite(out['loss'])
assert abs(out['log_vars']['total_loss'] - float(out['loss'])) < 1e-5, out['log_vars']
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
assert trainable and all(n.startswith('img_backbone.') for n in trainable), trainable
assert not any(k.startswith('teacher') for k in model.state_dict())
print('student ok')
""" % (list(manifest.CUSTOM_IMPORTS), TINY_EVA, TINY_HEADS), str(tmp_path / "teacher.pth"))
    assert proc.returncode == 0, proc.stderr
    assert "student ok" in proc.stdout
    setup = subprocess.run([sys.executable, "demo_kd_50_pruning.py", "--check-setup", "--config", "no/such.py"],
                           cwd=str(orion), capture_output=True, text=True, timeout=300)
    assert setup.returncode == 1 and "FAIL  config" in setup.stdout, setup.stdout + setup.stderr


def test_cli_rejects_a_missing_interpreter_before_copying(orion: Path, source: Path) -> None:
    before = tree_snapshot(orion)
    proc = run_cli([str(orion), "--source", str(source), "--python", str(orion / "no-such-python")])
    assert proc.returncode == 2 and "expected an executable Python interpreter" in proc.stderr
    assert tree_snapshot(orion) == before


def _outside_tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_install_refuses_a_symlinked_folder_leading_outside_the_root(orion: Path, source: Path,
                                                                     tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.py").write_text("# not ORION's\n")
    backbones = orion / "mmcv/models/backbones"
    moved = tmp_path / "backbones_real"
    backbones.rename(moved)
    backbones.symlink_to(outside, target_is_directory=True)
    before, outside_before = tree_snapshot(orion), _outside_tree(outside)
    with pytest.raises(inst.InstallError, match="refusing to write mmcv/models/backbones/.*outside the ORION root"):
        inst.install(orion, source_root=source)
    assert tree_snapshot(orion) == before and _outside_tree(outside) == outside_before
    proc = run_cli([str(orion), "--skip-import-check", "--source", str(source)])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "outside the ORION root" in proc.stderr


def test_uninstall_refuses_to_delete_through_a_symlinked_folder(orion: Path, source: Path, tmp_path: Path) -> None:
    inst.install(orion, source_root=source)
    hooks = orion / "mmcv/runner/hooks"
    outside = tmp_path / "hooks_elsewhere"
    hooks.rename(outside)  # the same bytes, now reached through a link that leaves the tree
    hooks.symlink_to(outside, target_is_directory=True)
    before, outside_before = tree_snapshot(orion), _outside_tree(outside)
    with pytest.raises(inst.InstallError, match="refusing to remove mmcv/runner/hooks/.*outside the ORION root"):
        inst.uninstall(orion)
    assert tree_snapshot(orion) == before and _outside_tree(outside) == outside_before
