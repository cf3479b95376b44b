"""tools/fidelity_table.py: the table it writes, its checks of the command line."""
from __future__ import annotations

import pytest

from tools.fidelity_table import ALLOCATIONS, markdown, measure


def test_the_table_shows_cosines_and_uneven_head_counts():
    rows = {"magnitude": {label: dict(cosine=0.98, heads_per_block=[8, 8]) for label, _, _ in ALLOCATIONS}}
    rows["magnitude"]["global, raw scores"] = dict(cosine=0.90125, heads_per_block=[1, 15])
    assert markdown(rows).splitlines() == [
        "| method | uniform | global, L2 per block | global, raw scores |", "|---|---|---|---|",
        "| magnitude | 0.9800 | 0.9800 | 0.9012 (1-15 per block) |"]


@pytest.mark.parametrize("argv", [["--ratio", "1.0"], ["--val-samples", "12"]])
def test_bad_options_are_refused(argv):
    from tools.fidelity_table import main
    with pytest.raises(SystemExit):
        main(argv)


def test_importance_is_scored_on_training_frames_and_fidelity_judged_on_validation(monkeypatch):
    from tools import head_pruning_utils as hpu

    seen = {}

    def fake_analysis(importance, dataloader, **kwargs):
        seen["judged"] = {m["split"] for batch in dataloader for m in batch["img_metas"]}
        return dict(results=[dict(cosine_similarity=0.5, heads_per_block=[8] * 4)])

    def fake_scores(name):
        def score(model, loader, **kwargs):
            seen[name] = {m["split"] for batch in loader for m in batch["img_metas"]}
            return hpu.compute_head_importance_magnitude(model)
        return score

    monkeypatch.setattr(hpu, "analyze_pruning_impact", fake_analysis)
    for method in ("entropy", "activation", "gradient"):
        monkeypatch.setattr(hpu, f"compute_head_importance_{method}", fake_scores(method))
    result = measure(0.5, 8, 1)
    assert seen == dict(entropy={"train"}, activation={"train"}, gradient={"train"}, judged={"val"})
    assert result["settings"]["importance_split"] == "train" and len(result["rows"]) == 4
