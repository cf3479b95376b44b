"""tools/export_onnx.py: the miniature backbone (teacher, heads-only, joint and depth-pruned students) in ONNX Runtime.

Each export takes about a second on one thread; parity is checked on random images and on frames
of the miniature world, with the shipped (trained) teacher's weights.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

onnx = pytest.importorskip("onnx")  # in setup.py's test extra; skipped only in an environment without it
pytest.importorskip("onnxruntime")

from mmcv import Config  # noqa: E402
from mmcv.datasets import SyntheticChatB2D  # noqa: E402
from mmcv.models.backbones.eva_vit_student import EVAViTStudent  # noqa: E402
from mmcv.runner.hooks.kd_hooks import KDExportStudentHook, KDRunError  # noqa: E402
from tests.test_kd_hooks import Wrapper, make_runner  # noqa: E402
from tests.test_orion_student import make_student, teacher_ckpt  # noqa: E402,F401  (a fixture)
from tools import export_onnx  # noqa: E402
from tools.export_onnx import OnnxExportError, export_backbone_onnx, onnx_runtime_session  # noqa: E402
from tools.tiny_teacher_asset import read_shipped_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = dict(Config.fromfile(str(ROOT / "adzoo/orion/configs/orion_tiny_train.py")).model.img_backbone)
#: Teacher heads and SwiGLU channels kept by the students (unsorted choices, not the first units).
HEADS = [[0, 2, 3, 5, 8, 11, 12, 15], [1, 4, 6, 7, 9, 10, 13, 14], [0, 1, 2, 3, 12, 13, 14, 15],
         [3, 4, 5, 6, 7, 8, 9, 10]]
HIDDEN = 341  # the tiny teacher's SwiGLU width: int(128 * 8 / 3)
#: Teacher blocks kept by the depth-pruned student: the first (windowed) and the last (global) block are removed.
BLOCKS = [1, 2]


def student_cfg(mlp_hidden: Any = None, blocks: Any = None) -> Dict[str, Any]:
    """Heads (+ channels, + blocks) as a budgeted configuration writes them: a removed block's entries are []."""
    def per_block(values: List[List[int]]) -> List[List[int]]:
        return [v if blocks is None or b in blocks else [] for b, v in enumerate(values)]

    cfg = dict(TINY_BACKBONE, type="EVAViTStudent", num_heads=8, teacher_num_heads=16,
               selected_heads_per_layer=per_block(HEADS))
    if mlp_hidden is not None:
        cfg.update(mlp_hidden=mlp_hidden, selected_channels_per_layer=per_block(
            [list(range(i, HIDDEN, 2))[:mlp_hidden] for i in (0, 1, 0, 1)]))
    if blocks is not None:
        cfg.update(selected_blocks=list(blocks))
    return cfg


def build(cfg: Dict[str, Any]) -> EVAViTStudent:
    return export_onnx.build_backbone(cfg, "test")


@pytest.fixture(scope="module")
def teacher() -> EVAViTStudent:
    """The shipped miniature teacher's backbone, as ``type='EVAViT'`` builds it for export."""
    state = read_shipped_teacher()["state_dict"]
    model = build(dict(TINY_BACKBONE, type="EVAViT"))
    model.load_state_dict({k[len("img_backbone."):]: v for k, v in state.items() if k.startswith("img_backbone.")})
    return model.eval()


@pytest.fixture(scope="module")
def frames() -> Dict[str, torch.Tensor]:
    """Camera images of two miniature-world samples, normalised as the detector sees them."""
    data = SyntheticChatB2D("val", num_samples=2, seed=0, img_size=(80, 80), num_cams=2)
    return {"frames": torch.cat([data[i]["img"] for i in range(2)])}


def pruned(teacher: EVAViTStudent, cfg: Dict[str, Any]) -> EVAViTStudent:
    student = build(cfg)
    student.load_from_teacher(teacher.state_dict())
    return student.eval()


@pytest.mark.parametrize("kind", ["teacher", "heads", "joint", "blocks"])
def test_onnx_runtime_matches_pytorch_on_random_images_and_world_frames(kind, teacher, frames, tmp_path) -> None:
    model = dict(teacher=lambda: teacher, heads=lambda: pruned(teacher, student_cfg()),
                 joint=lambda: pruned(teacher, student_cfg(mlp_hidden=120)),
                 blocks=lambda: pruned(teacher, student_cfg(mlp_hidden=120, blocks=BLOCKS)))[kind]()
    out = tmp_path / "backbone.onnx"
    sidecar = export_backbone_onnx(model, str(out), extra_inputs=frames)
    assert set(sidecar["parity"]["inputs"]) == {"random_batch2", "random_batch1", "frames"}
    session = onnx_runtime_session(str(out))
    for images in (frames["frames"][:3], torch.randn(5, 3, 80, 80)):  # batches the export never saw
        with torch.no_grad():
            expected = model(images)[0].numpy()
        got = session.run(None, {"img": images.numpy()})[0]
        assert got.shape == (len(images), 128, 10, 10)
        assert abs(got - expected).max() <= 1e-4
    assert max(r["max_abs_diff"] for r in sidecar["parity"]["inputs"].values()) <= 1e-4
    kept = BLOCKS if kind == "blocks" else [0, 1, 2, 3]
    described = sidecar["backbone"]
    assert (described["depth"], described["kept_blocks"], described["num_blocks"]) == (4, kept, len(kept))
    assert described["window_per_block"] == [4 if b in (0, 2) else 0 for b in kept]  # each its teacher block's kind
    assert described["num_heads"] == [16 if kind == "teacher" else 8] * len(kept)
    assert described["mlp_hidden"] == [120 if kind in ("joint", "blocks") else HIDDEN] * len(kept)
    if kind != "teacher":
        assert described["selected_heads_per_layer"] == [HEADS[b] for b in kept]
    # the graph holds the kept blocks only: norm1, norm2 and the SwiGLU's ffn_ln per block
    assert Counter(n.op_type for n in onnx.load(str(out)).graph.node)["LayerNormalization"] == 3 * len(kept)
    assert json.loads((tmp_path / "backbone.onnx.json").read_text()) == sidecar
    assert sidecar["onnx_sha256"] == export_onnx.file_sha256(str(out))
    assert sidecar["weights_sha256"] == export_onnx.tensors_sha256(model.state_dict())


def test_a_benchmark_session_does_not_leave_threads_spinning(teacher, tmp_path) -> None:
    """ONNX Runtime's busy-waiting workers would slow whatever runs next in the process (PyTorch's rounds)."""
    out = tmp_path / "backbone.onnx"
    export_backbone_onnx(teacher, str(out))
    quiet = onnx_runtime_session(str(out), threads=2, spin=False).get_session_options()
    default = onnx_runtime_session(str(out), threads=2).get_session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ONNX Runtime's own default: spin
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_the_graph_has_the_selection_and_rope_baked_in_and_only_the_batch_free(teacher, tmp_path) -> None:
    out = tmp_path / "joint.onnx"
    export_backbone_onnx(pruned(teacher, student_cfg(mlp_hidden=120)), str(out))
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["img"]  # no rope table, index or size input
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 80, 80]
    shapes = {tuple(t.dims) for t in graph.initializer}
    assert (8 * 8, 128) in shapes and (120, 128) in shapes  # kept heads x head_dim rows, kept channel rows
    assert not any((16 * 8, 128) == s or (HIDDEN, 128) == s for s in shapes)


def write_student_checkpoint(path: Path, model: EVAViTStudent, cfg: Dict[str, Any]) -> str:
    """The layout of KDExportStudentHook's checkpoint: meta['img_backbone'] and img_backbone.* weights."""
    state = {"img_backbone." + k: v for k, v in model.state_dict().items()}
    state["pts_bbox_head.weight"] = torch.zeros(2)  # the rest of the detector is ignored
    torch.save(dict(meta=dict(img_backbone=cfg), state_dict=state), path)
    return str(path)


def test_cli_exports_a_checkpoint_with_its_own_config_and_records_the_source(teacher, tmp_path, capsys) -> None:
    cfg = student_cfg(mlp_hidden=120)
    ckpt = write_student_checkpoint(tmp_path / "student_pruned.pth", pruned(teacher, cfg), cfg)
    sidecar = export_onnx.main([ckpt])
    out = tmp_path / "student_pruned_backbone.onnx"
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert sidecar["source"] == dict(path=ckpt, sha256=export_onnx.file_sha256(ckpt))
    assert sidecar["img_backbone"] == cfg and sidecar["opset"] == export_onnx.DEFAULT_OPSET
    teacher_config = str(ROOT / "adzoo/orion/configs/orion_tiny_train.py")  # an ORION config: its img_backbone
    teacher_ckpt_path = tmp_path / "teacher.pth"
    torch.save(dict(state_dict={"img_backbone." + k: v for k, v in teacher.state_dict().items()}), teacher_ckpt_path)
    got = export_onnx.main([str(teacher_ckpt_path), "--backbone-config", teacher_config, "--opset", "18"])
    assert got["opset"] == 18 and got["backbone"]["num_heads"] == [16] * 4
    assert (tmp_path / "teacher_backbone.onnx").is_file()


def assert_refused(argv, capsys, folder: Path, *words: str) -> None:
    before = set(folder.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err
    assert set(folder.iterdir()) == before  # no .onnx, no sidecar, no temporary file


def test_a_checkpoint_whose_selection_differs_from_its_config_is_refused(teacher, tmp_path, capsys) -> None:
    other = student_cfg()
    other["selected_heads_per_layer"] = [list(range(8))] * 4  # same counts, other heads
    ckpt = write_student_checkpoint(tmp_path / "student.pth", pruned(teacher, student_cfg()), other)
    assert_refused([ckpt], capsys, tmp_path, "student.pth", "head_index", "checkpoint keeps teacher heads")
    good = write_student_checkpoint(tmp_path / "good.pth", pruned(teacher, student_cfg()), student_cfg())
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps(student_cfg(mlp_hidden=150)))
    assert_refused([good, "--backbone-config", str(wider)], capsys, tmp_path, "good.pth", "wider.json",
                   "channel_index")
    broken = tmp_path / "broken.json"
    broken.write_text("{'img_backbone': ")
    assert_refused([good, "--backbone-config", str(broken)], capsys, tmp_path, "broken.json", "not valid JSON")


def test_a_depth_pruned_checkpoint_exports_and_kept_blocks_that_disagree_are_refused(teacher, tmp_path,
                                                                                    capsys) -> None:
    cfg = student_cfg(mlp_hidden=120, blocks=BLOCKS)  # heads + channels + blocks
    student = pruned(teacher, cfg)
    ckpt = write_student_checkpoint(tmp_path / "student_pruned.pth", student, cfg)
    sidecar = export_onnx.main([ckpt])
    assert "teacher blocks [1, 2] of 4" in capsys.readouterr().out
    assert sidecar["img_backbone"]["selected_blocks"] == BLOCKS and sidecar["backbone"]["kept_blocks"] == BLOCKS
    assert sidecar["weights_sha256"] == export_onnx.tensors_sha256(student.state_dict())
    session = onnx_runtime_session(str(tmp_path / "student_pruned_backbone.onnx"))
    images = torch.randn(3, 3, 80, 80)
    with torch.no_grad():
        assert abs(session.run(None, {"img": images.numpy()})[0] - student(images)[0].numpy()).max() <= 1e-4
    written = tmp_path / "student_pruned_backbone.onnx.json"  # a sidecar names what to build
    again = export_onnx.main([ckpt, "--backbone-config", str(written), "--out", str(tmp_path / "again.onnx")])
    assert again["backbone"] == sidecar["backbone"]
    capsys.readouterr()
    other = student_cfg(mlp_hidden=120, blocks=[1, 3])  # same counts, another block kept
    mislabelled = write_student_checkpoint(tmp_path / "mislabelled.pth", student, other)
    assert_refused([mislabelled], capsys, tmp_path, "mislabelled.pth", "its own meta", "kept_blocks",
                   "checkpoint keeps teacher blocks [1, 2], this model keeps [1, 3]")
    other_sidecar = tmp_path / "other_backbone.onnx.json"
    other_sidecar.write_text(json.dumps(dict(sidecar, img_backbone=other)))
    assert_refused([ckpt, "--backbone-config", str(other_sidecar)], capsys, tmp_path, "student_pruned.pth",
                   "other_backbone.onnx.json", "kept_blocks", "this model keeps [1, 3]")
    unrecorded = tmp_path / "teacher_weights.pth"  # every teacher block, no record of which: cannot be these two
    torch.save(dict(meta=dict(img_backbone=cfg), state_dict={
        "img_backbone." + k: v for k, v in teacher.state_dict().items() if k != "kept_blocks"}), unrecorded)
    assert_refused([str(unrecorded)], capsys, tmp_path, "teacher_weights.pth", "without kept_blocks")


def test_an_opset_that_cannot_be_written_or_run_is_refused(teacher, tmp_path, capsys, monkeypatch) -> None:
    ckpt = write_student_checkpoint(tmp_path / "student.pth", pruned(teacher, student_cfg()), student_cfg())
    assert_refused([ckpt, "--opset", "40"], capsys, tmp_path, "opset 40", "writes opsets 14..")
    assert_refused([ckpt, "--out", str(tmp_path / "student.pth" / "b.onnx")], capsys, tmp_path, "student.pth")
    real_export = export_onnx._torchscript_export

    def export_then_stamp_a_future_opset(*args: Any) -> None:  # what a runtime older than the opset meets
        real_export(*args)
        model = onnx.load(args[2])
        model.opset_import[0].version = 99
        onnx.save(model, args[2])

    monkeypatch.setattr(export_onnx, "_torchscript_export", export_then_stamp_a_future_opset)
    assert_refused([ckpt], capsys, tmp_path, "ONNX Runtime", "cannot run this model (opset 99)", "--opset")


def test_a_parity_miss_is_refused(teacher, tmp_path, capsys) -> None:
    ckpt = write_student_checkpoint(tmp_path / "student.pth", pruned(teacher, student_cfg()), student_cfg())
    assert_refused([ckpt, "--atol", "1e-9"], capsys, tmp_path, "ONNX Runtime differs from PyTorch by",
                   "--atol 1e-09", "nothing was written")


def test_missing_onnxruntime_is_one_line_and_writes_nothing(teacher, tmp_path, capsys, monkeypatch) -> None:
    ckpt = write_student_checkpoint(tmp_path / "student.pth", pruned(teacher, student_cfg()), student_cfg())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert_refused([ckpt], capsys, tmp_path, "onnxruntime is not installed", "pip install")
    with pytest.raises(KDRunError, match="onnxruntime is not installed"):
        KDExportStudentHook(onnx=True)  # refused before training, not after it


@pytest.mark.parametrize("selection", ["magnitude", "budgeted"])
def test_export_hook_writes_the_onnx_next_to_the_checkpoint(selection, teacher_ckpt, tmp_path) -> None:  # noqa: F811
    from tests.test_orion_student import student_backbone_cfg
    from tests.test_orion_student_depth import KEPT, budgeted_config

    student = make_student(teacher_ckpt) if selection == "magnitude" else make_student(
        teacher_ckpt, pruning_config=budgeted_config(tmp_path), img_backbone=student_backbone_cfg())
    hook = KDExportStudentHook(filename="student.pth", inference_config=None, onnx=True)
    hook.after_run(make_runner(Wrapper(student), str(tmp_path)))
    assert hook.written["onnx"] == str(tmp_path / "student_backbone.onnx")
    sidecar = json.loads((tmp_path / "student_backbone.onnx.json").read_text())
    assert sidecar["source"]["path"] == str(tmp_path / "student.pth")
    assert sidecar["backbone"]["selected_heads_per_layer"] == student.img_backbone.selected_heads
    assert sidecar["img_backbone"] == student.student_backbone_cfg
    kept = KEPT if selection == "budgeted" else [0, 1, 2, 3]
    assert sidecar["backbone"]["kept_blocks"] == kept and sidecar["backbone"]["num_blocks"] == len(kept)
    with pytest.raises(KDRunError, match="opset 3"):
        KDExportStudentHook(onnx=True, onnx_opset=3)


def test_onnx_benchmark_keeps_every_round_and_both_runtimes(tmp_path) -> None:
    from mmcv.models.utils.pruning_config import PruningConfig
    from tools import benchmark_onnx

    budgeted = tmp_path / "budgeted.json"  # heads + channels + blocks, as a budget writes them (removed block: [])
    PruningConfig(selected_heads_per_layer=[list(range(4, 8)), []], teacher_num_heads=16, pruning_ratio=0.75,
                  selected_channels_per_layer=[list(range(512)), []], teacher_mlp_hidden=2730,
                  mlp_pruning_ratio=0.8, selected_blocks=[0]).save(budgeted)
    out = tmp_path / "bench.json"
    result = benchmark_onnx.main(["--depth", "2", "--image-size", "32", "--repeats", "2", "--warmup", "0",
                                  "--student", "8:1536@1", "--pruning-config", str(budgeted), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = ("teacher", "8h_mlp1536_blocks1", "budgeted")
    assert set(result["times_s"]) == {f"{m}/{r}" for m in names for r in ("onnxruntime", "pytorch")}
    assert all(len(times) == 2 for times in result["times_s"].values())
    students = result["students"]
    assert [(s["kept_blocks"], s["heads"], s["mlp_hidden"]) for s in students.values()] == [([1], 8, 1536),
                                                                                           ([0], 4, 512)]
    assert students["budgeted"]["ceiling"] > students["8h_mlp1536_blocks1"]["ceiling"] > 2  # half the blocks, less
    for name, student in students.items():
        for runtime in ("onnxruntime", "pytorch"):
            rounds = student[runtime]["ratio_per_round"]
            assert rounds == [t / s for t, s in zip(result["times_s"][f"teacher/{runtime}"],
                                                     result["times_s"][f"{name}/{runtime}"])]
            spread = student[runtime]["ratio"]
            assert spread["min"] <= spread["median"] <= spread["max"]
    assert max(result["parity_max_abs_diff"].values()) <= 1e-4 and result["pruning_configs"] == [str(budgeted)]
    assert result["load_average_before"] is not None and result["cpu"] and result["versions"]["onnxruntime"]
    assert benchmark_onnx.parse_student("12:2048@0,2,3").kwargs == dict(num_heads=12, mlp_hidden=2048,
                                                                       selected_blocks=[0, 2, 3])


def test_onnx_benchmark_refuses_a_configuration_for_another_depth(tmp_path, capsys) -> None:
    from mmcv.models.utils.pruning_config import PruningConfig
    from tools import benchmark_onnx

    config = tmp_path / "four_blocks.json"
    PruningConfig(selected_heads_per_layer=[list(range(8))] * 4, teacher_num_heads=16, pruning_ratio=0.5,
                  selected_blocks=[0, 1, 3]).save(config)
    with pytest.raises(SystemExit) as exit_info:
        benchmark_onnx.main(["--depth", "3", "--pruning-config", str(config), "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "four_blocks.json: made for 4 blocks" in err and "--depth 4" in err
    assert not (tmp_path / "b.json").exists()
