"""Detect a real mmcv (or another package claiming a top-level ``mmcv``) next to this standalone package.

ORION-KD's standalone install provides a top-level ``mmcv`` light core with ORION's import paths.
In an environment that already has OpenMMLab's mmcv (``mmcv``, ``mmcv-full``, ``mmcv-lite``) the two
would silently shadow or overwrite each other. This file is standard-library only, so ``setup.py``
runs it with the target interpreter before installing, and ``mmcv/__init__.py`` runs it at import.
Run as a script it prints the explanation and exits 1 when it finds a clash. Light core only.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, List, NamedTuple, Optional

OWN_DISTRIBUTION = "orion-kd"
#: Distributions known to install a top-level ``mmcv`` even without a top_level.txt record.
KNOWN_MMCV_DISTRIBUTIONS = ("mmcv", "mmcv-full", "mmcv-lite")


class ForeignDistribution(NamedTuple):
    name: str
    version: str
    location: str


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def foreign_distributions(paths: Optional[Iterable[str]] = None, top_level: str = "mmcv") -> List[ForeignDistribution]:
    """Installed distributions other than ORION-KD that provide the top-level package ``top_level``.

    ``paths``: where to look (default ``sys.path``), as ``importlib.metadata`` does.
    """
    from importlib import metadata
    found = {}
    search = list(sys.path if paths is None else paths)
    for dist in metadata.distributions(path=search):
        name = dist.metadata.get("Name") or ""
        if not name or _normalise(name) == OWN_DISTRIBUTION:
            continue
        tops = (dist.read_text("top_level.txt") or "").split()
        if top_level in tops or _normalise(name) in KNOWN_MMCV_DISTRIBUTIONS:
            location = str(dist.locate_file("")) if hasattr(dist, "locate_file") else ""
            found.setdefault(_normalise(name), ForeignDistribution(name, dist.version or "?", location))
    return sorted(found.values())


def clash_message(found: Iterable[ForeignDistribution]) -> str:
    """One paragraph: what clashes, why it matters, and the two ways out."""
    names = ", ".join(f"{d.name} {d.version} (in {d.location})" for d in found)
    return (f"this environment has {names}, which provides a top-level 'mmcv' package. ORION-KD's standalone "
            f"install (orion-kd) would shadow it with its own light 'mmcv' (or be shadowed by it), so imports of "
            f"mmcv would silently resolve to the wrong one. Use a separate virtual environment for the standalone "
            f"package, or, inside ORION's environment, use the overlay instead of pip: "
            f"python tools/install_into_orion.py PATH/TO/Orion")


def main() -> int:
    found = foreign_distributions()
    if found:
        print("orion-kd: refusing to install: " + clash_message(found), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]  # the script's folder is no install
    sys.exit(main())
