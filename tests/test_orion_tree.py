"""The plugin in ORION's own code: the ORION-tree tier (``ORION_ROOT``, default ``../shared/orion``).

The plugin is installed with ``tools/install_into_orion.py`` into a copy of the tree's code, and the scenarios
of ``tests/orion_tree/scenarios.py`` run ORION's files from that copy in a process of their own: ``Config``,
registries, ``build_model``, ``custom_train_model`` (adzoo/orion/apis/mmdet_train.py), optimizer
constructor, ``IterBasedRunner``, ``Fp16OptimizerHook``, ``CheckpointHook``, text logger, evaluation hook,
``runner.resume`` and ``load_checkpoint``. What cannot run on a CPU is stubbed or substituted, and every
stub is named: ``tests/orion_tree/boot.py`` (``STUBS``: the LLM stack (peft, ORION's llava_llama), ORION's
``mmcv/datasets/utils.py``, and torchvision, IPython, pycocotools, cv2 only where absent) and
``tests/orion_tree/scenarios.py`` (``CPU_SUBSTITUTES``: ``Module.cuda``, ``torch.cuda.current_device``, DDP
without ``device_ids``, ``runner.resume`` mapping to the CPU, and ``torch.amp.GradScaler('cpu')`` where
ORION's ``Fp16OptimizerHook`` creates the CUDA scaler). The base detector and dataset are small stand-ins
(``tests/orion_tree/tier_models.py``) for ORION's ``Orion`` and ``B2DOrionDataset``, which need the LLM and
CUDA heads.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from tests.orion_tree import boot, tree
from tests.orion_tree.tree import REPO, installed_copy, run_scenarios, scenario_result
from tools import plugin_manifest as manifest

_ROOT, _WHY_NOT = tree.orion_root_setting()
if _ROOT is None and not os.environ.get("ORION_ROOT"):
    pytest.skip(_WHY_NOT, allow_module_level=True)  # one line for the whole tier; a wrong ORION_ROOT fails

KD_CONFIG = "adzoo/orion/configs/orion_stage3_kd_train.py"
#: load reads what train exported, budget_load what budget exported
SCENARIOS = ("config", "epoch", "train", "load", "ddp", "fp16", "budget", "budget_load")
#: What scenarios.BUDGET keeps of the tier's teacher (2 blocks, 4 heads, MLP width 85): block 1, heads 0, 1 and 3, and
#: every third SwiGLU channel (counts the KD config's ratios, 0.5, would not keep: a budgeted file decides them).
BUDGET = dict(blocks=[1], heads=[0, 1, 3], channels=list(range(1, 85, 3)))


def tree_digest(root: Path) -> str:
    """sha256 over ORION's code files (names, modes, contents)."""
    digest = hashlib.sha256()
    for rel in tree.code_files(root):
        digest.update("{} {:o}\n".format(rel, os.stat(str(root / rel)).st_mode).encode())
        digest.update((root / rel).read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def tier(orion_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    base = tmp_path_factory.mktemp("orion_tree")
    out = base / "out"
    out.mkdir()
    digest = tree_digest(orion_root)
    copy = installed_copy(orion_root, base / "Orion")
    output = run_scenarios(copy, out, SCENARIOS)  # one process: ORION's imports are paid once
    return dict(root=orion_root, digest=digest, copy=copy, out=out, output=output)


def scenario(tier: Dict[str, Any], name: str) -> Dict[str, Any]:
    """The JSON one scenario wrote; its traceback when it failed in ORION's code."""
    result, error = scenario_result(tier["out"], name)
    assert result, "scenario {} failed in ORION's code:\n{}".format(name, error[-4000:])
    return result


# --------------------------------------------------------------------------- ORION's Config and registries
def test_orions_config_resolves_the_plugins_custom_imports_and_custom_hooks(tier) -> None:
    result = scenario(tier, "config")
    copy = str(tier["copy"])
    assert result["config_file"] == str(tier["copy"] / KD_CONFIG)
    assert result["custom_imports"] == list(manifest.CUSTOM_IMPORTS)
    for name, path in result["imported_from"].items():  # the installed files, not this repository's
        assert path == os.path.join(copy, *name.split(".")) + ".py", (name, path)
    assert result["model_type"] == "OrionStudent" and result["student_file"].startswith(copy)
    hooks = {h["type"]: h for h in result["hooks"]}
    assert {"KDCheckHook", "KDAlphaScheduleHook", "NonFiniteGuardHook", "KDExportStudentHook"} <= set(hooks)
    assert all(h["file"].startswith(copy) for h in hooks.values())  # built from ORION's HOOKS, installed files
    assert set(result["stubs"]) <= set(boot.STUBS) | {"torchvision.utils", "pycocotools.mask"}
    assert {"peft", "mmcv.utils.llava_llama"} <= set(result["stubs"])  # the LLM stack never runs here


def test_epoch_arithmetic_and_work_dir_of_orions_config_and_launcher_agree_with_the_plugin(tier) -> None:
    result = scenario(tier, "config")
    text = (tier["root"] / "adzoo/orion/configs/orion_stage3_train.py").read_text()
    samples = int(re.search(r"num_iters_per_epoch\s*=\s*(\d+)\s*//\s*\(num_gpus\s*\*\s*batch_size\)", text).group(1))
    per_epoch = samples // (result["num_gpus"] * result["batch_size"])  # computed once, when the file runs
    assert result["num_iters_per_epoch"] == per_epoch
    assert result["runner"]["max_iters"] == result["num_epochs"] * per_epoch
    assert result["checkpoint_config"]["interval"] == per_epoch == result["num_iters_to_seq"]
    assert result["optimizer_config"]["type"] == "Fp16OptimizerHook"  # every step goes through a GradScaler
    alpha_hook = next(h for h in result["hooks"] if h["type"] == "KDAlphaScheduleHook")["config"]
    if "iters_per_epoch" in alpha_hook:  # an epoch of the KD schedule is ORION's epoch
        assert alpha_hook["iters_per_epoch"] == per_epoch
    # ORION's launcher appends --work-dir (the config path, configs -> work_dirs) after the user's arguments.
    launcher = (tier["root"] / "adzoo/orion/orion_dist_train.sh").read_text()
    line = next(line for line in launcher.splitlines() if line.startswith("WORK_DIR="))
    work_dir = subprocess.run(["bash", "-c", "CFG={}; {}; echo $WORK_DIR".format(KD_CONFIG, line)],
                              stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout.strip()
    assert work_dir == "adzoo/orion/work_dirs/orion_stage3_kd_train/"
    assert launcher.index("${@:3}") < launcher.index("--work-dir ${WORK_DIR}")
    name = work_dir.split("adzoo/orion/")[1]  # work_dirs/orion_stage3_kd_train/
    docs = [REPO / "README_KD.md", REPO / "adzoo/orion/configs/orion_stage3_kd_infer.py",
            REPO / KD_CONFIG] + sorted((REPO / "docs").glob("**/*.md"))
    mentions = [(p.name, m.start()) for p in docs for m in re.finditer(re.escape(name), p.read_text())]
    assert mentions, "the guide never says where ORION's launcher puts the student ({})".format(work_dir)
    wrong = [(p.name, line) for p in docs for line in p.read_text().splitlines()
             if name in line and work_dir not in line and "--work-dir" not in line]
    assert not wrong, "these lines name a work dir ORION's launcher does not use ({}): {}".format(work_dir, wrong)


def test_orions_epoch_for_other_gpus_stops_in_one_line_whose_cfg_options_make_the_run_agree(tier) -> None:
    """ORION's num_iters_per_epoch counts 32 GPUs; a run on other GPUs must not count other epochs silently."""
    config = scenario(tier, "config")
    result = scenario(tier, "epoch")
    stop = result["stop"]
    assert stop is not None and stop["type"] == "KDRunError" and "\n" not in stop["message"], stop
    per_epoch = result["options"]["num_iters_per_epoch"]  # this run's: 12 samples / (2 per GPU x 1 process)
    assert per_epoch == 6 and "config counts {}".format(config["num_iters_per_epoch"]) in stop["message"]
    # the options, parsed by ORION's DictAction and merged by its Config, give a run of ORION's epochs
    epochs, kd = config["num_epochs"], config["kd_config"]
    assert result["max_iters"] == epochs * per_epoch
    warm = kd["warmup_epochs"] * per_epoch
    assert [(r["iter"], r["alpha"]) for r in result["records"]] == \
        [(i, kd["warmup_alpha"] if i <= warm else kd["finetune_alpha"]) for i in range(1, epochs * per_epoch + 1)]
    keep = config["checkpoint_config"]["max_keep_ckpts"]
    assert result["checkpoints"] == sorted("iter_{}.pth".format(per_epoch * e) for e in range(epochs - keep + 1,
                                                                                               epochs + 1))


# --------------------------------------------------------------------------- training in ORION's runner
def test_orion_student_trains_in_custom_train_model_and_resumes_with_orions_runner(tier) -> None:
    kd = scenario(tier, "config")["kd_config"]
    result = scenario(tier, "train")
    first, resumed = result["first"], result["resumed"]
    # kd_config.warmup_iters=2 in the tier: iterations 1-2 (1-based, as logged) warm up
    assert [(r["iter"], r["alpha"]) for r in first] == [
        (1, kd["warmup_alpha"]), (2, kd["warmup_alpha"]), (3, kd["finetune_alpha"]), (4, kd["finetune_alpha"])]
    for record in first:
        assert record["loss"] == pytest.approx(record["total_loss"], abs=1e-4)
        assert record["total_loss"] == pytest.approx((1 - record["alpha"]) * record["task_loss"]
                                                     + record["alpha"] * record["backbone_distill_loss"], abs=1e-3)
        assert "grad_norm" in record  # ORION's Fp16OptimizerHook clipped and stepped
    # ORION saves the 0-based index of the iteration that ran: resuming iter_2.pth repeats iteration 2.
    assert result["saved_meta_iter"] == 1 and result["resumed_at"] == 1
    assert [r["iter"] for r in resumed] == [2, 3, 4]
    alpha_of = {r["iter"]: r["alpha"] for r in first}
    assert [r["alpha"] for r in resumed] == [alpha_of[r["iter"]] for r in resumed]
    lr_of = {r["iter"]: r["lr"] for r in first}
    assert [r["lr"] for r in resumed] == pytest.approx([lr_of[r["iter"]] for r in resumed])
    assert result["resumed_weights_differing"] == []  # the student backbone continues from iter_2.pth
    assert result["resumed_optimizer_steps"] == result["saved_optimizer_steps"] == [2.0]
    assert result["final_optimizer_steps"] == [5.0]  # AdamW's state went on: 2 saved + 3 resumed steps
    assert result["loss_scaler"]["scale"] > 0  # ORION's hook saved its scaler state for a resume


def test_orions_checkpoint_saver_writes_the_student_only(tier) -> None:
    """ORION's saver keeps non-persistent buffers too: the student must hold none, nor the teacher."""
    result = scenario(tier, "train")
    assert result["non_persistent_buffers"] == []
    assert result["saved_keys"] == result["model_keys"]
    assert not [k for k in result["saved_keys"] if "teacher" in k]
    assert {"iter_2.pth", "iter_4.pth", "latest.pth", "student_pruned.pth"} <= set(result["files"])


def test_ddp_forward_and_the_evaluation_hook_that_validate_builds(tier) -> None:
    """custom_train_model(distributed=True, validate=True) in a 1-process gloo group."""
    result = scenario(tier, "ddp")
    runner = result["runner"]
    assert runner["ddp"], runner  # ORION's runner calls DDP(model)(data, return_loss=True)
    assert all(path.startswith(str(tier["copy"])) for path in runner["files"]), runner["files"]  # ORION's code
    assert os.path.join(str(tier["copy"]), "mmcv", "runner", "iter_based_runner.py") in runner["files"]
    assert "CustomDistEvalHook" in runner["hooks"] and runner["eval_by_epoch"] == [False]
    assert [r["iter"] for r in result["records"]] == [2, 4] and all("alpha" in r for r in result["records"])
    assert [r["tier_eval_samples"] for r in result["evaluations"]] == [12.0]  # every val sample, once


# --------------------------------------------------------------------------- fp16 and the guard
def test_fp16_with_an_enabled_scaler_the_guard_stops_a_diverged_run(tier) -> None:
    """Inf gradients, finite loss: the GradScaler skips every step; the guard must count those and stop."""
    result = scenario(tier, "fp16")
    assert result["scaler_enabled"] and result["scaler_device"] == "cpu"
    assert result["weights_unchanged"]  # no step reached the optimizer
    assert result["error"] is not None and result["error"]["type"] == "NonFiniteTrainingError", result["error"]
    assert result["iterations"] < result["max_iters"]
    assert not result["export_written"]


# --------------------------------------------------------------------------- ORION's loader
def test_orions_non_strict_load_takes_the_exported_student_and_refuses_another_selection(tier) -> None:
    result = scenario(tier, "load")
    assert result["meta_pruning"]["selected_heads_per_layer"] == result["kept"]
    assert result["same_selection_loaded_equal"]
    refused = result["refused"]
    assert refused is not None, "load_checkpoint(strict=False) loaded a student with other heads"
    assert "head_index" in refused["message"] and "\n" not in refused["message"].strip()
    assert str(result["kept"][0]) in refused["message"] and str(result["other"][0]) in refused["message"]


# --------------------------------------------------------------------------- a budgeted configuration
def test_the_kd_config_takes_a_budgeted_file_like_a_heads_only_one_and_trains_in_orions_runner(tier) -> None:
    """Heads + channels + blocks from PruningConfig.save, given as model.pruning_config with head_selection=None."""
    kd = scenario(tier, "config")["kd_config"]
    result = scenario(tier, "budget")
    assert result["head_selection"] is None and result["source"] == "pruning_config " + result["pruning_config"]
    assert not {"selected_blocks", "mlp_hidden", "selected_heads_per_layer"} & set(result["given_backbone"])
    assert result["given_backbone"].get("num_heads") is None and kd["pruning_ratio"] == 0.5  # as shipped
    assert result["kept_blocks"] == BUDGET["blocks"] and result["selected_heads"] == [BUDGET["heads"]]
    assert result["selected_channels"] == [BUDGET["channels"]]
    assert result["initial_from_teacher_block"] == {"0": False, "1": True}  # the kept block starts as teacher block 1
    assert [(r["iter"], r["alpha"]) for r in result["records"]] == [
        (1, kd["warmup_alpha"]), (2, kd["warmup_alpha"]), (3, kd["finetune_alpha"]), (4, kd["finetune_alpha"])]
    for record in result["records"]:
        assert record["total_loss"] == pytest.approx((1 - record["alpha"]) * record["task_loss"]
                                                     + record["alpha"] * record["backbone_distill_loss"], abs=1e-3)
        assert record["feature_distill_loss"] > 0 and "grad_norm" in record
    assert result["trained_keys"] and all(k.startswith("img_backbone.") for k in result["trained_keys"])
    assert result["exported_blocks"] == ["0"] and result["exported_kept_blocks"] == BUDGET["blocks"]
    meta = result["meta_pruning"]
    assert meta["selected_blocks"] == BUDGET["blocks"] and meta["selected_heads_per_layer"] == [[], BUDGET["heads"]]
    assert meta["selected_channels_per_layer"] == [[], BUDGET["channels"]]
    assert result["meta_backbone"]["selected_blocks"] == BUDGET["blocks"]
    assert {"student_pruned.pth", "student_pruned_infer.py"} <= set(result["files"])


def test_the_budgeted_student_loads_through_orions_inference_config_and_other_blocks_are_refused(tier) -> None:
    result = scenario(tier, "budget_load")
    assert result["infer_base"] == str(tier["copy"] / "adzoo/orion/configs/orion_stage3_kd_infer.py")
    assert result["infer_model_type"] == "Orion"  # everything but img_backbone is ORION's inference config
    backbone = result["infer_backbone"]
    assert backbone["selected_blocks"] == BUDGET["blocks"] and backbone["depth"] == 2
    assert backbone["selected_heads_per_layer"] == [[], BUDGET["heads"]]
    assert result["kept_blocks"] == BUDGET["blocks"] and result["state_equal"]
    assert result["forward_equal"] and result["forward_shape"] == [3, 32, 4, 4]  # the trained student's backbone
    refused = result["refused"]
    assert refused is not None, "load_checkpoint(strict=False) loaded a student that keeps another block"
    assert refused["type"] == "SelectionMismatchError" and "\n" not in refused["message"].strip()
    assert "kept_blocks" in refused["message"] and "blocks [1], this model keeps [0]" in refused["message"]
    assert result["other_blocks"] == [0]


def test_the_orion_tree_itself_is_never_written(tier) -> None:
    assert tree_digest(tier["root"]) == tier["digest"]
    assert all((tier["copy"] / rel).is_file() for rel in manifest.PLUGIN_FILES)


def test_install_adds_only_plugin_files_to_orions_tree_and_uninstall_restores_it(orion_root: Path,
                                                                                   tmp_path: Path) -> None:
    copy = tree.code_copy(orion_root, tmp_path / "Orion")
    before = {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    install = [sys.executable, "-B", str(REPO / "tools/install_into_orion.py"), str(copy), "--skip-import-check"]
    proc = subprocess.run(install, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    after = {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert {rel: after[rel] for rel in before} == before  # none of ORION's files changed
    assert sorted(set(after) - set(before)) == sorted([manifest.RECORD_NAME] + list(manifest.PLUGIN_FILES))
    proc = subprocess.run(install + ["--uninstall"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
