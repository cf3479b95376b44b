"""The generated docs blocks show the evidence: verdicts of the study, benchmark spreads, no % of an exceeded ceiling."""
from __future__ import annotations

import json

from tools.render_results import _bench_table, study_block


def backbone_result(speedup: float) -> dict:
    times = dict(teacher_sdpa=[2.0, 2.2], student_sdpa=[1.0, 1.1])
    return dict(depth=6, image_size=640, dtype="fp32", device_name="CPU X", device="cpu", threads=2, torch="2.x",
                repeats=2, student="8 heads", load_average=[1.5, 1.0, 1.0], median_s=dict(teacher_sdpa=2.1),
                time_spread_s=dict(teacher_sdpa=dict(min=2.0, median=2.1, max=2.2)),
                ratio_spread=dict(speedup=dict(min=1.9, median=2.0, max=2.1)), times_s=times, speedup=speedup,
                ceiling=1.8, efficiency=speedup / 1.8, beyond_ceiling="what the count leaves out" if speedup > 1.8 else None)


def test_a_speedup_above_the_ceiling_is_explained_not_given_as_a_share_of_it(tmp_path):
    above = _bench_table(tmp_path / "a.json", backbone_result(2.0))
    assert "efficiency" not in above and "Note: what the count leaves out." in above
    assert "| median teacher_sdpa | 2100.0 ms (2000.0-2200.0) |" in above and "per round 1.900-2.100x" in above
    assert "load average 1.50" in above and "CPU X" in above
    below = _bench_table(tmp_path / "b.json", backbone_result(1.5))
    assert "| efficiency | 83.3% of the ceiling |" in below and "Note:" not in below


def test_the_study_block_carries_the_paired_verdicts(tmp_path):
    study = dict(table="T", detail_table="D", findings=["- finding"], verdicts=["- 50%: KD vs task loss only: ahead"])
    (tmp_path / "study.json").write_text(json.dumps(study))
    (tmp_path / "commands.json").write_text(json.dumps(["python tools/kd_study.py"]))
    block = study_block(tmp_path)
    assert "- 50%: KD vs task loss only: ahead" in block and "more than 2 standard errors" in block
    assert "\n- finding\n" in block and "- - " not in block
