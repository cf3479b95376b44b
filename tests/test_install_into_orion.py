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
from typing import Dict, Iterable, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools import install_into_orion as inst  # noqa: E402
from tools import plugin_manifest as manifest  # noqa: E402

PY38 = Path("/root/.pyenv/versions/3.8.18/bin/python")

# ----------------------------------------------------------------------------- fake ORION
FAKE_ORION: Dict[str, str] = {
    "mmcv/__init__.py": '"""Fake ORION mmcv package (tests only)."""\n__version__ = "1.x-fake"\n',
    "mmcv/utils/__init__.py": '''
        """A few of ORION's mmcv.utils helpers."""
        import functools
        import importlib
        import random


        def get_dist_info():
            return 0, 1


        def set_random_seed(seed, deterministic=False):
            import torch
            random.seed(seed)
            torch.manual_seed(seed)


        def import_modules_from_strings(imports, allow_failed_imports=False):
            single = isinstance(imports, str)
            mods = [importlib.import_module(name) for name in ([imports] if single else imports)]
            return mods[0] if single else mods


        class Config(dict):
            """mmcv 1.x's Config, reduced to what the plugin reads: a dict of a .py file's names."""

            @classmethod
            def fromfile(cls, path):
                import runpy
                return cls({k: v for k, v in runpy.run_path(path).items() if not k.startswith('__')})

            def __getattr__(self, name):
                return self[name]


        def auto_fp16(apply_to=None, out_fp32=False):
            def wrap(fn):
                @functools.wraps(fn)
                def inner(*args, **kwargs):
                    return fn(*args, **kwargs)
                return inner
            return wrap
        ''',
    "mmcv/models/__init__.py": '''
        from .builder import *  # noqa
        from . import backbones, detectors  # noqa
        ''',
    "mmcv/models/builder.py": '''
        """mmcv-1.x-like registry: one object under every alias; duplicates raise KeyError."""


        class Registry(object):
            def __init__(self, name):
                self._name = name
                self._module_dict = {}

            def get(self, key):
                return self._module_dict.get(key)

            def register_module(self, name=None, module=None):
                def _register(cls):
                    key = name or cls.__name__
                    if key in self._module_dict:
                        raise KeyError("{} is already registered in {}".format(key, self._name))
                    self._module_dict[key] = cls
                    return cls
                return _register(module) if module is not None else _register

            def build(self, cfg, default_args=None):
                args = dict(cfg)
                obj_type = args.pop("type")
                cls = self.get(obj_type) if isinstance(obj_type, str) else obj_type
                if cls is None:
                    raise KeyError("{} is not in the {} registry".format(obj_type, self._name))
                for key, value in (default_args or {}).items():
                    args.setdefault(key, value)
                return cls(**args)


        MODELS = Registry("models")
        BACKBONES = NECKS = HEADS = LOSSES = DETECTORS = SEGMENTORS = MODELS


        def build_backbone(cfg):
            return BACKBONES.build(cfg)


        def build_neck(cfg):
            return NECKS.build(cfg)


        def build_head(cfg):
            return HEADS.build(cfg)


        def build_loss(cfg):
            return LOSSES.build(cfg)


        def build_model(cfg, train_cfg=None, test_cfg=None):
            return DETECTORS.build(cfg, default_args=dict(train_cfg=train_cfg, test_cfg=test_cfg))


        build_detector = build_model
        ''',
    "mmcv/models/utils/__init__.py": '"""ORION keeps shared model helpers here."""\n',
    "mmcv/models/backbones/__init__.py": "from .vit import FakeViT  # noqa\n",
    "mmcv/models/backbones/vit.py": '''
        """ORION's own backbone, in miniature: one patch embedding."""
        from torch import nn

        from ..builder import BACKBONES


        @BACKBONES.register_module()
        class FakeViT(nn.Module):
            def __init__(self, embed_dim=16, patch_size=8, in_chans=3):
                super().__init__()
                self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

            def forward(self, x):
                return [self.patch_embed(x)]
        ''',
    "mmcv/models/detectors/__init__.py": "from .orion import Orion  # noqa\n",
    "mmcv/models/detectors/orion.py": '''
        """ORION's detector contract in miniature (img_backbone, heads, grid mask, loss parsing)."""
        from collections import OrderedDict

        import torch
        import torch.nn.functional as F
        from torch import nn

        from mmcv.models.builder import DETECTORS, HEADS, build_backbone, build_head, build_neck
        from mmcv.utils import auto_fp16


        @HEADS.register_module()
        class FakeHead(nn.Linear):
            def __init__(self, in_channels=16, out_channels=3):
                super().__init__(in_channels, out_channels)


        class GridMask(nn.Module):
            """Zeroes every fourth row band of the image in training."""

            def forward(self, x):
                if not self.training:
                    return x
                mask = torch.ones_like(x)
                mask[..., ::4, :] = 0
                return x * mask


        @DETECTORS.register_module()
        class Orion(nn.Module):
            def __init__(self, img_backbone=None, img_neck=None, pts_bbox_head=None, map_head=None,
                         lm_head=None, use_grid_mask=False, train_cfg=None, test_cfg=None, **kwargs):
                super().__init__()
                self.img_backbone = build_backbone(img_backbone) if img_backbone else None
                self.img_neck = build_neck(img_neck) if img_neck else None
                self.pts_bbox_head = build_head(pts_bbox_head)
                self.map_head = build_head(map_head)
                self.lm_head = build_head(lm_head)
                self.tokenizer = None
                self.grid_mask = GridMask()
                self.use_grid_mask = use_grid_mask
                self.train_cfg, self.test_cfg = train_cfg, test_cfg

            def extract_img_feat(self, img, img_metas=None):
                B, N = img.shape[:2]
                img = img.squeeze(0) if B == 1 else img.reshape(B * N, *img.shape[2:])
                if self.use_grid_mask:
                    img = self.grid_mask(img)
                feats = self.img_backbone(img)
                if self.img_neck is not None:
                    feats = self.img_neck(feats)
                return [f.reshape(B, N, *f.shape[1:]) for f in feats]

            @auto_fp16(apply_to=("img",), out_fp32=True)
            def extract_feat(self, img, img_metas=None):
                return self.extract_img_feat(img, img_metas)

            def _pool(self, img, img_metas):
                return self.extract_feat(img, img_metas)[0].mean(dim=(1, 3, 4))

            def forward_train(self, img=None, img_metas=None, gt_labels=None, map_targets=None, **kwargs):
                pooled = self._pool(img, img_metas)
                return dict(
                    loss_cls=F.cross_entropy(self.pts_bbox_head(pooled), gt_labels),
                    loss_bbox_lane=F.mse_loss(self.map_head(pooled), map_targets),
                    vlm_loss=F.cross_entropy(self.lm_head(pooled), gt_labels),
                )

            def forward_test(self, img=None, img_metas=None, **kwargs):
                pooled = self._pool(img, img_metas)
                return [dict(labels=int(i)) for i in self.pts_bbox_head(pooled).argmax(-1)]

            def forward(self, data, return_loss=True):
                if not return_loss:
                    return self.forward_test(**data)
                losses = self.forward_train(**data)
                loss, log_vars = self._parse_losses(losses)
                return dict(loss=loss, log_vars=log_vars, num_samples=len(data["img_metas"]))

            def _parse_losses(self, losses):
                log_vars = OrderedDict((k, v.mean()) for k, v in losses.items())
                loss = sum(v for k, v in log_vars.items() if "loss" in k)
                log_vars["loss"] = loss
                return loss, OrderedDict((k, float(v)) for k, v in log_vars.items())
        ''',
    "mmcv/runner/__init__.py": "from .hooks import HOOKS, Hook  # noqa\n",
    "mmcv/runner/hooks/__init__.py": '''
        """ORION's hook registry and base class, in miniature."""
        from mmcv.models.builder import Registry

        HOOKS = Registry("hook")


        class Hook(object):
            def before_run(self, runner):
                pass

            def after_run(self, runner):
                pass
        ''',
    "adzoo/__init__.py": "",
    "adzoo/orion/__init__.py": "",
}
# ORION's own files next to the plugin's paths (names as in the public ORION tree): the overlay
# must add beside them and change none of them.
for _rel in ("adzoo/orion/train.py", "adzoo/orion/test.py", "adzoo/orion/apis/__init__.py",
             "adzoo/orion/apis/train.py", "adzoo/orion/apis/mmdet_train.py", "adzoo/orion/apis/test.py",
             "adzoo/orion/configs/orion_stage3_train.py", "adzoo/orion/configs/orion_stage3_infer.py",
             "adzoo/orion/configs/orion_stage3.py", "mmcv/models/backbones/eva_vit.py",
             "mmcv/models/utils/grid_mask.py", "mmcv/models/utils/layer_decay_optimizer_constructor.py",
             "mmcv/runner/hooks/hook.py", "mmcv/runner/hooks/optimizer.py"):
    FAKE_ORION.setdefault(_rel, "# ORION's {} (fake tree)\n".format(_rel))
FAKE_ORION["adzoo/orion/orion_dist_train.sh"] = "#!/usr/bin/env bash\n# ORION's launcher: CONFIG GPUS [args]\n"

# A miniature plugin source tree: the manifest's paths, registering the manifest's types.
FAKE_PLUGIN_SOURCES: Dict[str, str] = {
    "mmcv/models/backbones/eva_vit_student.py": '''
        from mmcv.models.builder import BACKBONES
        from mmcv.models.backbones.vit import FakeViT


        @BACKBONES.register_module()
        class EVAViTStudent(FakeViT):
            pass
        ''',
    "mmcv/models/detectors/orion_student.py": '''
        from mmcv.models.builder import DETECTORS
        from mmcv.models.detectors.orion import Orion


        @DETECTORS.register_module()
        class OrionStudent(Orion):
            pass
        ''',
    "mmcv/models/losses/kd_losses.py": '''
        from mmcv.models.builder import LOSSES


        @LOSSES.register_module()
        class CombinedKDLoss(object):
            pass
        ''',
    "mmcv/runner/hooks/kd_hooks.py": '''
        from mmcv.runner.hooks import HOOKS, Hook


        @HOOKS.register_module()
        class KDAlphaScheduleHook(Hook):
            pass


        @HOOKS.register_module()
        class KDCheckHook(Hook):
            pass


        @HOOKS.register_module()
        class KDExportStudentHook(Hook):
            pass
        ''',
}


def write_tree(root: Path, files: Dict[str, str]) -> None:
    """Write ``files`` (relative path -> dedented text) under ``root``."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def make_fake_orion(tmp_path: Path) -> Path:
    """A fake ORION checkout with its own mmcv, registry and Orion detector."""
    root = tmp_path / "Orion"
    write_tree(root, FAKE_ORION)
    os.chmod(str(root / "adzoo/orion/orion_dist_train.sh"), 0o755)
    return root


def make_fake_source(tmp_path: Path) -> Path:
    """A fake ORION-KD checkout holding every manifest file (tiny registering modules)."""
    src = tmp_path / "orion_kd_src"
    files = {rel: FAKE_PLUGIN_SOURCES.get(rel, "# {} (fake plugin source)\n".format(rel))
             for rel in manifest.PLUGIN_FILES}
    write_tree(src, files)
    return src


def tree_snapshot(root: Path) -> Dict[str, Optional[str]]:
    """Every file (-> sha256 and mode) and folder (-> None) under ``root``."""
    snap = {}  # type: Dict[str, Optional[str]]
    for dirpath, dirnames, filenames in os.walk(str(root)):
        rel_dir = os.path.relpath(dirpath, str(root))
        snap[rel_dir + "/"] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                digest = hashlib.sha256(fh.read()).hexdigest()
            snap[os.path.join(rel_dir, name)] = "{} {:o}".format(digest, os.stat(path).st_mode & 0o777)
    return snap


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
    for rel in ("adzoo/orion/orion_dist_train.sh", "adzoo/orion/train_kd.py", "adzoo/orion/apis/train_kd.py"):
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
    files = ["mmcv/models/utils/checkpoint_io.py", "mmcv/models/utils/eva_cost.py", "mmcv/models/utils/eva_surgery.py",
             "mmcv/models/utils/head_importance.py", "mmcv/models/utils/pruning_config.py",
             "mmcv/models/backbones/eva_vit_student.py"]
    inst.install(orion, source_root=REPO_ROOT, files=files)
    inst.check_imports(orion, python=sys.executable, modules=["mmcv.models.backbones.eva_vit_student"])
    proc = run_script(orion, TEACHER_SCRIPT, str(tmp_path / "teacher.pth"))
    assert proc.returncode == 0, proc.stderr
    assert "teacher ok" in proc.stdout
    inst.uninstall(orion)
    assert tree_snapshot(orion) == before


@pytest.mark.skipif(not (REPO_ROOT / "mmcv/models/detectors/orion_student.py").exists(),
                    reason="OrionStudent (mmcv/models/detectors/orion_student.py) not written yet")
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
