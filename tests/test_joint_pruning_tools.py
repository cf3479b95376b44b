"""Joint impact analysis (counts from the architecture, measured fidelity of the really pruned backbone), the channel
heat map and the joint command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcv.models.backbones.eva_vit import EVAViT
from mmcv.models.backbones.eva_vit_student import EVAViTStudent
from tests.eva_reference import reference_macs, reference_param_count
from tests.head_pruning_fixtures import HEADS, ORION_L, SMALL, loader_of, make_teacher
from tests.test_head_pruning_analysis import _RandomViews  # noqa: F401  (registers the CLI dataset and detector)
from tools.head_pruning_utils import (ChannelImportance, HeadImportance, PruningConfig, analyze_pruning_impact,
                                      compute_channel_importance_magnitude, compute_head_importance_magnitude,
                                      create_pruning_config, describe_backbone, main, plot_channel_importance,
                                      plot_fidelity_vs_ratio)

PNG = b"\x89PNG\r\n\x1a\n"


def test_joint_analysis_of_orion_l_geometry_equals_the_architecture_counts():
    with torch.device("meta"):
        backbone = EVAViT(**ORION_L)
    geometry = describe_backbone(backbone)
    heads = HeadImportance(torch.rand(24, 16), "magnitude", metadata=dict(backbone=geometry))
    channels = ChannelImportance(torch.rand(24, 2730), "magnitude")
    analysis = analyze_pruning_impact(heads, pruning_ratios=(0.5,), strategies=("uniform",), verbose=False,
                                      channel_importance=channels, mlp_pruning_ratios=(0.25, 1 - 1536 / 2730))
    windows = [16 if i % 3 != 2 else 0 for i in range(24)]
    full_params = reference_param_count(embed_dim=1024, depth=24, heads_per_block=[16] * 24, head_dim=64,
                                        mlp_hidden=2730, patch_size=16, pos_tokens=197)

    def macs(hidden):
        return reference_macs(img_hw=(640, 640), patch_size=16, in_chans=3, embed_dim=1024, mlp_hidden=hidden,
                              head_dim=64, heads_per_block=[8] * 24, window_per_block=windows)

    for row, hidden in zip(analysis["results"], (2048, 1536)):
        assert row["mlp_hidden_per_block"] == [hidden] * 24 and row["heads_per_block"] == [8] * 24
        assert row["speedup_ceiling"] == pytest.approx(analysis["full"]["macs"] / macs(hidden), rel=1e-12)
        pruned = reference_param_count(embed_dim=1024, depth=24, heads_per_block=[8] * 24, head_dim=64,
                                       mlp_hidden=hidden, patch_size=16, pos_tokens=197)
        removed = row["attention_params_removed"] + row["mlp_params_removed"]
        assert full_params - removed == pruned
        assert row["backbone_params_removed_fraction"] == pytest.approx(removed / full_params)
    assert round(analysis["results"][1]["speedup_ceiling"], 2) == 1.87


def test_measured_joint_fidelity_is_that_of_the_really_pruned_student(tmp_path, capsys):
    teacher = make_teacher(seed=9)
    loader = loader_of(2)
    heads, channels = compute_head_importance_magnitude(teacher), compute_channel_importance_magnitude(teacher)
    analysis = analyze_pruning_impact(heads, pruning_ratios=(0.5,), model=teacher, dataloader=loader,
                                      strategies=("global",), channel_importance=channels, mlp_pruning_ratios=(0.5,),
                                      save_path=tmp_path / "a.json")
    assert "mlp kept/block" in capsys.readouterr().out
    row = analysis["results"][0]
    student = EVAViTStudent(**SMALL, num_heads=row["heads_per_block"], teacher_num_heads=HEADS,
                            selected_heads_per_layer=row["selected_heads_per_layer"],
                            mlp_hidden=row["mlp_hidden_per_block"],
                            selected_channels_per_layer=row["selected_channels_per_layer"]).eval()
    student.load_from_teacher(teacher.state_dict())
    with torch.no_grad():
        cos = [F.cosine_similarity(student(x)[0].flatten(1).double(), teacher(x)[0].flatten(1).double()).item()
               for x in loader]
    assert row["cosine_similarity"] == pytest.approx(float(np.mean(cos)), abs=1e-6)
    assert row["cosine_similarity"] < 0.9999  # something was removed
    plot_fidelity_vs_ratio(analysis, tmp_path / "fid.png")
    config = create_pruning_config(heads, 0.5, channel_importance=channels, mlp_pruning_ratio=0.5)
    plot_channel_importance(channels, tmp_path / "channels.png", pruning_config=config)
    for name in ("fid.png", "channels.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="does not select channels"):
        plot_channel_importance(channels, tmp_path / "x.png", pruning_config=create_pruning_config(heads, 0.5))


def test_joint_command_line_end_to_end(tmp_path):
    teacher = make_teacher(seed=10)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"state_dict": {"img_backbone." + k: v for k, v in teacher.state_dict().items()}}, ckpt)
    backbone_cfg = dict(SMALL, type="EVAViTStudent", num_heads=4, teacher_num_heads=HEADS, mlp_hidden=128)
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(f"model = dict(type='HPUTestDetector', img_backbone={backbone_cfg!r})\n"
                   f"data = dict(train=dict(type='HPURandomViews', length=4))\n")
    common = ["--config", str(cfg), "--checkpoint", str(ckpt), "--num-batches", "2", "--device", "cpu"]
    for method in ("magnitude", "gradient", "activation"):
        assert main(["importance", *common, "--unit", "channels", "--method", method,
                     "--out", str(tmp_path / f"ch_{method}.npz")]) == 0
    magnitude = ChannelImportance.load(tmp_path / "ch_magnitude.npz")
    assert torch.allclose(magnitude.scores, compute_channel_importance_magnitude(teacher).scores)
    assert ChannelImportance.load(tmp_path / "ch_gradient.npz").num_samples == 2
    assert main(["importance", *common, "--out", str(tmp_path / "heads.json")]) == 0
    assert main(["prune-config", "--importance", str(tmp_path / "heads.json"), "--pruning-ratio", "0.5",
                 "--channel-importance", str(tmp_path / "ch_gradient.npz"), "--mlp-hidden", "128",
                 "--strategy", "cost", "--channel-multiple", "32", "--out", str(tmp_path / "joint.json")]) == 0
    config = PruningConfig.load(tmp_path / "joint.json")
    assert config.prunes_channels and sum(config.mlp_hidden) <= 3 * 128
    assert all(w % 32 == 0 for w in config.mlp_hidden) and config.channel_method == "gradient"
    assert main(["analyze", *common, "--importance", str(tmp_path / "heads.json"), "--pruning-ratios", "0.5",
                 "--channel-method", "activation", "--mlp-pruning-ratios", "0.25", "0.5",
                 "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["results"]
    assert [r["mlp_pruning_ratio"] for r in rows] == [0.25, 0.5] * 2 and all("cosine_similarity" in r for r in rows)
    assert main(["plot", "--importance", str(tmp_path / "ch_gradient.npz"), "--pruning-config",
                 str(tmp_path / "joint.json"), "--out", str(tmp_path / "ch.png")]) == 0
    assert (tmp_path / "ch.png").read_bytes()[:8] == PNG


def test_joint_command_line_user_errors_exit_2_with_one_line(tmp_path, capsys):
    HeadImportance(torch.rand(2, 4), "x").save(tmp_path / "imp.json")
    ChannelImportance(torch.rand(2, 32), "x").save(tmp_path / "ch.json")
    base = ["prune-config", "--importance", str(tmp_path / "imp.json"), "--out", str(tmp_path / "p.json")]
    cases = [
        (["--channel-importance", str(tmp_path / "ch.json")], "given without --mlp-pruning-ratio / --mlp-hidden"),
        (["--channel-importance", str(tmp_path / "ch.json"), "--mlp-hidden", "40"], r"--mlp-hidden: expected 1..32"),
        (["--channel-importance", str(tmp_path / "imp.json"), "--mlp-hidden", "16"],
         "not a channel importance file .*it holds head importance"),
        (["--mlp-hidden", "16"], "give --channel-importance FILE, or --config"),
        (["--strategy", "cost"], "strategy 'cost' needs unit costs"),
        (["--unit-costs", str(tmp_path / "nope.json"), "--strategy", "cost"], "unit costs file not found"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert __import__("re").search(message, err), (message, err)
    assert not (tmp_path / "p.json").exists()
