"""``--check-setup`` in an ORION checkout: ORION's own tree and Config, the plugin installed, fake data.

Runs the installed demo_kd_50_pruning.py in a temporary copy of ORION's real tree (tests/orion_checkout.py)
with the files the stage-3 config reads created by the test, and checks what each line says.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from tests.orion_checkout import installed_orion_copy, run_in_orion
from tools.kd_setup_check import FAIL, PASS, WARN, Check

KD_CONFIG = "adzoo/orion/configs/orion_stage3_kd_train.py"
#: What ORION's stage-3 config reads (adzoo/orion/configs/orion_stage3_train.py), as the check names them.
INPUTS = ("ckpts/pretrain_qformer", "data/bench2drive", "data/bench2drive/maps", "data/chat-B2D/train",
          "data/infos/b2d_infos_train.pkl", "data/infos/b2d_infos_val.pkl", "data/infos/b2d_map_infos.pkl")


def fitting_teacher(path: Path) -> None:
    """ORION-L's img_backbone keys and shapes as expanded zeros: a few bytes on disk, a full-size teacher to check."""
    from mmcv.models.backbones.eva_vit_student import EVAViTStudent

    with torch.device("meta"):
        backbone = EVAViTStudent(num_heads=16, teacher_num_heads=16, img_size=640, patch_size=16, window_size=16,
                                 embed_dim=1024, depth=24, mlp_ratio=4 * 2 / 3, qkv_bias=True,
                                 window_block_indexes=[i for i in range(24) if i % 3 != 2])
    state = {"img_backbone." + k: torch.zeros(1, dtype=v.dtype).expand(v.shape)
             for k, v in backbone.state_dict().items() if not k.endswith(("head_index", "channel_index"))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(meta={}, state_dict=state), str(path))


@pytest.fixture(scope="module")
def orion(tmp_path_factory, orion_root: Path) -> Path:
    copy = installed_orion_copy(orion_root, tmp_path_factory.mktemp("orion") / "Orion")
    for rel in INPUTS:
        target = copy / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"") if rel.endswith(".pkl") else target.mkdir(exist_ok=True)
    fitting_teacher(copy / "ckpts/Orion.pth")
    return copy


def report(proc) -> Dict[str, List[str]]:
    """name -> the lines (status and detail, then fix) of that check."""
    lines: Dict[str, List[str]] = {}
    name = None
    for line in proc.stdout.splitlines():
        found = re.match(r"(PASS|WARN|FAIL)  (\S+)\s+(.*)", line)
        if found:
            name = found.group(2)
            lines.setdefault(name, []).append("{} {}".format(found.group(1), found.group(3)))
        elif line.strip().startswith("fix: ") and name:
            lines[name][-1] += " | " + line.strip()
    return lines


def test_check_setup_names_every_input_of_orions_config_and_the_launcher(orion: Path) -> None:
    proc = run_in_orion(orion, "demo_kd_50_pruning.py", "--check-setup", "--config", KD_CONFIG)
    lines = report(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    paths = [line.split(" (read by")[0] for line in lines["path"]]
    assert paths == ["PASS " + rel for rel in INPUTS], lines["path"]
    assert lines["teacher"][0].startswith("PASS ckpts/Orion.pth"), lines["teacher"]
    assert lines["plugin"][0].startswith("PASS registered:") and "ResumeCheckHook" in lines["plugin"][0]
    assert re.match(r"PASS \d+ files installed .*identical to the ORION-KD repository", lines["plugin_files"][0])
    assert lines["launcher"][0].startswith("WARN adzoo/orion/orion_dist_train.sh has no executable bit")
    assert "bash adzoo/orion/orion_dist_train.sh CONFIG GPUS" in lines["launcher"][0]
    assert "adzoo/orion/work_dirs/orion_stage3_kd_train/" in lines["work_dir"][0]
    if not torch.cuda.is_available():
        assert lines["gpus"][0].startswith("FAIL no CUDA GPU visible") and "num_gpus=32" in lines["gpus"][0]
        assert proc.returncode == 1
    flash = lines["flash_attn"][0]
    assert flash.startswith("PASS" if _has("flash_attn") else "FAIL flash_attn=True (model.img_backbone.flash_attn")


def test_check_setup_fails_each_missing_input_with_where_it_comes_from(orion: Path) -> None:
    chat = orion / "data/chat-B2D"
    chat.rename(orion / "data/Chat-B2D")  # the archive's name, not the config's
    edited = orion / "tools/kd_setup_orion.py"
    original = edited.read_bytes()
    edited.write_bytes(original + b"# edited\n")
    try:
        proc = run_in_orion(orion, "demo_kd_50_pruning.py", "--check-setup", "--config", KD_CONFIG)
    finally:
        (orion / "data/Chat-B2D").rename(chat)
        edited.write_bytes(original)
    lines = report(proc)
    failed = [line for line in lines["path"] if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL not found: data/chat-B2D/train (read by data.train."), \
        failed
    assert "data/chat-B2D/ is lower case" in failed[0]
    assert lines["plugin_files"][0].startswith("WARN 1 of") and "edited here since install" in lines["plugin_files"][0]
    assert "install_into_orion.py" in lines["plugin_files"][0] and proc.returncode == 1


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def test_gpus_against_num_gpus_says_what_an_epoch_then_covers(monkeypatch) -> None:
    from tools import kd_setup_orion

    cfg = dict(num_gpus=32, num_iters_per_epoch=1834, data=dict(samples_per_gpu=4))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    line = kd_setup_orion.check_gpus(cfg)
    assert line.status == WARN and "8 CUDA GPU(s) visible" in line.detail
    assert "one such 'epoch' reads 58688 samples, 25% of one on 32" in line.detail and "runner.max_iters" in line.fix
    cfg["num_gpus"] = 8
    assert kd_setup_orion.check_gpus(cfg).status == PASS
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kd_setup_orion.check_gpus(cfg) == Check("gpus", FAIL, kd_setup_orion.check_gpus(cfg).detail,
                                                    kd_setup_orion.check_gpus(cfg).fix)


def test_launcher_work_dir_is_the_one_orions_launcher_appends() -> None:
    from tools.kd_setup_orion import launcher_work_dir

    assert launcher_work_dir(KD_CONFIG) == "adzoo/orion/work_dirs/orion_stage3_kd_train/"
    assert os.path.basename(launcher_work_dir("my/configs/x.py").rstrip("/")) == "x"
