"""The ORION_ROOT setting of the ORION-tree tier (tests/test_orion_tree.py): which tree, or why none; CI's."""
from __future__ import annotations

import os
import shutil
import subprocess
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


def test_ci_runs_exactly_make_test_with_orion_root_at_the_tree_beside_the_clone(tmp_path: Path) -> None:
    clone, fake_bin = tmp_path / "clone", tmp_path / "bin"
    (clone / ".ci").mkdir(parents=True)
    shutil.copy2(str(tree.REPO / ".ci" / "run"), str(clone / ".ci" / "run"))
    fake_bin.mkdir()
    (fake_bin / "make").write_text('#!/bin/sh\necho "make $* ORION_ROOT=${ORION_ROOT:-unset} cwd=$(pwd)"\n')
    (fake_bin / "make").chmod(0o755)
    env = dict(os.environ, PATH="{}{}{}".format(fake_bin, os.pathsep, os.environ["PATH"]))
    env.pop("ORION_ROOT", None)

    def ci(**extra: str) -> str:
        proc = subprocess.run(["bash", str(clone / ".ci" / "run")], env=dict(env, **extra), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, check=True)
        return proc.stdout.strip()

    assert ci() == "make test ORION_ROOT=unset cwd={}".format(clone)  # no tree: the tier skips itself
    (tmp_path / "shared" / "orion").mkdir(parents=True)
    assert ci() == "make test ORION_ROOT={} cwd={}".format(tmp_path / "shared" / "orion", clone)
    assert ci(ORION_ROOT="/my/Orion") == "make test ORION_ROOT=/my/Orion cwd={}".format(clone)
