"""Suite-wide settings for running the tests in parallel workers (``make test`` uses ``pytest -n 2``).

Under pytest-xdist every worker uses one torch thread (and so do the processes the tests start), so two
workers share two cores without oversubscribing them. ``make test`` distributes whole files
(``--dist loadfile``: a file's module fixtures are built once), and the files that take minutes are
collected first so that no worker starts one of them while the other is about to finish.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest

from tests.orion_tree.tree import orion_root_setting

# The files that take a minute or more on one thread (the demo, the fault table's 50 subprocess rows, the
# launcher loop and the study), longest first. Only the order changes; every test still runs.
LONG_FILES = ("test_demo_and_benchmarks.py", "test_fault_table.py", "test_train_kd.py", "test_kd_study.py",
              "test_orion_mmcv1x.py", "test_install_into_orion.py", "test_tiny_orion.py", "test_orion_tree.py")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every subprocess a test starts
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order inside a file and among the other files is kept


@pytest.fixture(scope="session")
def orion_root() -> Path:
    """The ORION tree the ORION-tree tier runs against: ``ORION_ROOT``, else ``../shared/orion`` if present.

    Without a tree the tier skips with one line; an ``ORION_ROOT`` that is not an ORION tree fails.
    """
    root, why = orion_root_setting()
    if root is None:
        if os.environ.get("ORION_ROOT"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return root
