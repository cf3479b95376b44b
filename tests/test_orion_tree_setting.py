"""The ORION_ROOT setting of the ORION-tree tier (tests/test_orion_tree.py): which tree, or why none."""
from __future__ import annotations

from pathlib import Path

from tests.orion_tree import tree


def test_orion_root_setting_names_the_tree_or_says_in_one_line_why_not(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ORION_ROOT", raising=False)
    monkeypatch.setattr(tree, "DEFAULT_ROOT", tmp_path / "shared" / "orion")
    root, why = tree.orion_root_setting()
    assert root is None and why.startswith("no ORION tree: set ORION_ROOT=") and "\n" not in why
    monkeypatch.setenv("ORION_ROOT", str(tmp_path))
    root, why = tree.orion_root_setting()
    assert root is None and why.startswith("ORION_ROOT={}: not an ORION tree".format(tmp_path))
    for rel in tree.ORION_MARKERS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert tree.orion_root_setting() == (tmp_path.resolve(), "")
