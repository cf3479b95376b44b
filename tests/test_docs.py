"""The docs: generated blocks match their JSON and the code, the guide keeps its shape, links resolve."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tools import render_reference, render_results
from tools.render_results import ROOT, RenderError, replace_blocks, run

DOC_FILES = [ROOT / "README.md", ROOT / "README_KD.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Figures drawn by a docs script that lands separately; linked already so that the pages need no second edit.


def test_results_and_readme_match_their_json() -> None:
    assert run(check=True) == [], "run: python tools/render_results.py"


def test_reference_matches_the_code() -> None:
    assert run(check=True, targets=render_reference.renderers()) == [], "run: python tools/render_reference.py"


def test_check_mode_sees_a_changed_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    monkeypatch.setattr(render_results, "DOCS", docs)
    results = docs / "results.md"
    targets = {str(results): render_results.renderers()["docs/results.md"]}
    assert run(check=True, targets=targets) == []  # the copy is up to date
    curve = json.loads((docs / "tiny_teacher_curve.json").read_text())
    curve["chance"]["det_f1"] += 0.5
    (docs / "tiny_teacher_curve.json").write_text(json.dumps(curve))
    before = results.read_text()
    assert run(check=True, targets=targets) == list(targets)
    assert results.read_text() == before  # --check writes nothing
    assert run(check=False, targets=targets) == list(targets)
    assert "| image-blind chance | 0.517 |" in results.read_text()


def test_blocks_and_renderers_must_pair() -> None:
    text = "a\n<!-- BEGIN generated: x -->\nold\n<!-- END generated: x -->\nb\n"
    assert replace_blocks(text, {"x": "new"}, "f.md") == "a\n<!-- BEGIN generated: x -->\nnew\n<!-- END generated: x -->\nb\n"
    with pytest.raises(RenderError, match=r"missing \['y'\]"):
        replace_blocks(text, {"x": "new", "y": "z"}, "f.md")
    with pytest.raises(RenderError, match=r"without a renderer \['x'\]"):
        replace_blocks(text, {}, "f.md")


def test_a_new_kd_config_key_needs_its_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    from mmcv.models.utils import kd_config

    monkeypatch.setitem(kd_config.KD_CONFIG_KEYS, "new_key", 1)
    with pytest.raises(RenderError, match="lacks \\['new_key'\\]"):
        render_reference.kd_config_block()


def test_render_results_reports_a_missing_json_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(render_results, "DOCS", ROOT / "docs/absent")
    assert render_results.main(["--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiny_teacher_curve.json: missing" in err


def test_the_guide_is_short_with_contents_and_links() -> None:
    lines = (ROOT / "README_KD.md").read_text().splitlines()
    assert len(lines) <= 400
    assert [n for n, line in enumerate(lines, 1) if len(line) > 200] == []
    text = "\n".join(lines)
    assert "## Contents" in text
    for page in ("docs/reference.md", "docs/results.md", "docs/troubleshooting.md", "docs/glossary.md"):
        assert f"]({page}" in text, page


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(target)
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_do_not_talk_about_how_they_were_made(path: Path) -> None:
    text = render_results.BLOCK.sub("", path.read_text())  # generated blocks quote the code's own strings
    for phrase in (r"\bissue\s+#?\d+", r"\bthis session\b", r"\bthe issue'?s?\b", r"No GPU was available",
                   r"\boriginal guide\b", r"\bprevious teacher\b", r"Python >= 3\.8"):
        assert not re.search(phrase, text, re.I), f"{path.name}: {phrase}"


def _anchors(path: Path) -> set:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to dashes."""
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return slugs
