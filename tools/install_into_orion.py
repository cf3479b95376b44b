#!/usr/bin/env python
"""Add the ORION-KD plugin files to an ORION checkout, or remove them again.

    python tools/install_into_orion.py PATH/TO/Orion --python PATH/TO/ORION/ENV/bin/python [--dry-run]
    python tools/install_into_orion.py PATH/TO/Orion --uninstall [--dry-run]

Copies the files of the plugin manifest (``tools/plugin_manifest.py``) to the
same relative paths in ORION, creating folders as needed. The overlay only
adds: it never replaces a file it did not install. If any target path already
exists as ORION's file (or as one of ours edited since), every such conflict is
listed in one error and nothing is written. What was copied (with sha256) and
the folders created are recorded in ``.orion_kd_install.json`` in the ORION root
(written atomically); ``--uninstall`` removes exactly that, so the tree is
restored byte for byte (files edited since install are kept and reported).
After installing, the plugin modules are imported by ORION's interpreter
(``--python``, bytecode writing off) in the ORION root to prove that they
register there.

Python 3.8 compatible and standard library only: it may run under ORION's
interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple

if __package__:
    from . import plugin_manifest as manifest
else:  # run as a script: the manifest is the sibling file
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plugin_manifest as manifest  # noqa: E402

RECORD_FORMAT = 2
CHECK_MARKER = "@@ORION_KD_IMPORT_CHECK@@"
DEFAULT_IMPORT_TIMEOUT_S = 600.0


class InstallError(Exception):
    """A problem the user has to fix; the CLI prints it as one message and exits 1."""


# --------------------------------------------------------------------------- helpers
def info(msg: str) -> None:
    """Progress line on stdout."""
    print(msg, flush=True)


def warn(msg: str) -> None:
    """Warning line on stderr."""
    print("warning: " + msg, file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, mode: Optional[int] = None) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` atomically, keeping ``src``'s permission bits."""
    atomic_write_bytes(dst, src.read_bytes(), mode=src.stat().st_mode & 0o7777)


def check_relpath(rel: str, what: str) -> PurePosixPath:
    """Validate a POSIX path relative to a root (no absolute parts, no ``..``)."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise InstallError("{}: expected a relative path inside the ORION root, got {!r}".format(what, rel))
    return pure


def inside_root(root: Path, rel: str, action: str) -> Path:
    """``root / rel`` after resolving every symlink on the way; refuses a path that leaves ``root``.

    ``root`` is already resolved. A symlinked folder anywhere on the way (``mmcv/models/backbones`` ->
    elsewhere) would make the overlay write or delete outside the ORION checkout.
    """
    target = (root / rel).resolve()
    if target != root and not str(target).startswith(str(root) + os.sep):
        raise InstallError("refusing to {} {}: it resolves to {}, outside the ORION root {} (a symlinked folder on "
                           "the way); expected every plugin path inside the checkout".format(action, rel, target, root))
    return target


def check_orion_root(path: Path) -> Path:
    """Resolve ``path`` and make sure it looks like an ORION checkout."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise InstallError("ORION root {} is not a folder (expected an ORION checkout)".format(root))
    missing = [m for m in manifest.ORION_MARKERS if not (root / m).exists()]
    if missing:
        raise InstallError(
            "{} does not look like an ORION checkout: expected {}, missing {}".format(
                root, " and ".join(manifest.ORION_MARKERS), ", ".join(missing)))
    return root


# --------------------------------------------------------------------------- record
def record_path(root: Path) -> Path:
    """Where the install record lives in an ORION root."""
    return root / manifest.RECORD_NAME


def load_record(root: Path) -> Optional[dict]:
    """Read and validate the install record; ``None`` when there is none."""
    path = record_path(root)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InstallError("install record {} is unreadable ({}); expected JSON written by this tool".format(
            path, exc))
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise InstallError("install record {}: expected format {}, got {!r}".format(
            path, RECORD_FORMAT, record.get("format") if isinstance(record, dict) else type(record).__name__))
    files = record.get("files")
    dirs = record.get("created_dirs")
    if not isinstance(files, dict) or not isinstance(dirs, list):
        raise InstallError("install record {}: expected 'files' (object) and 'created_dirs' (list)".format(path))
    for rel, entry in files.items():
        check_relpath(rel, "install record file")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise InstallError("install record {}: entry {!r} has no sha256".format(path, rel))
    for rel in dirs:
        check_relpath(rel, "install record folder")
    return record


def write_record(root: Path, record: dict) -> None:
    """Write the install record atomically (sorted, human-readable JSON)."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(record_path(root), text.encode("utf-8"))


def new_record(source_root: Path) -> dict:
    """An empty install record."""
    return {
        "format": RECORD_FORMAT,
        "tool": "ORION-KD tools/install_into_orion.py",
        "source": str(source_root),
        "installed_at": None,
        "custom_imports": list(manifest.CUSTOM_IMPORTS),
        "files": {},
        "created_dirs": [],
    }


# --------------------------------------------------------------------------- install
class Action(object):
    """One planned file operation: ``kind`` is new, update (our own file) or same."""

    def __init__(self, kind: str, rel: str) -> None:
        self.kind = kind
        self.rel = rel

    def __repr__(self) -> str:
        return "Action({!r}, {!r})".format(self.kind, self.rel)


def _dirs_to_create(root: Path, rels: Sequence[str]) -> List[str]:
    """Parent folders of ``rels`` missing under ``root``, shallow first."""
    out = []  # type: List[str]
    for rel in rels:
        parts = PurePosixPath(rel).parts[:-1]
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            target = root / sub
            if target.exists() and not target.is_dir():
                raise InstallError("{} exists but is not a folder (needed for {})".format(target, rel))
            if not target.exists() and sub not in out:
                out.append(sub)
    return out


def plan_install(root: Path, source_root: Path, files: Sequence[str],
                 record: Optional[dict]) -> Tuple[List[Action], List[str], List[str]]:
    """Plan an install: (actions, folders to create, conflicts: paths the overlay may not write)."""
    missing = manifest.missing_sources(source_root, files)
    if missing:
        raise InstallError("plugin source files missing under {} (expected every manifest file): {}".format(
            source_root, ", ".join(missing)))
    recorded = record["files"] if record else {}
    actions = []  # type: List[Action]
    conflicts = []  # type: List[str]
    for rel in files:
        check_relpath(rel, "manifest entry")
        inside_root(root, rel, "write")
        src, dst = source_root / rel, root / rel
        if dst.is_symlink() or (dst.exists() and not dst.is_file()):
            conflicts.append("{} (exists and is not a regular file)".format(rel))
        elif not dst.exists():
            actions.append(Action("new", rel))
        elif rel not in recorded:
            conflicts.append("{} (ORION's file)".format(rel))
        elif sha256_file(dst) != recorded[rel]["sha256"]:
            conflicts.append("{} (installed by ORION-KD, edited since)".format(rel))
        else:
            actions.append(Action("same" if sha256_file(dst) == sha256_file(src) else "update", rel))
    return actions, _dirs_to_create(root, [a.rel for a in actions]), conflicts


def install(orion_root: Path, source_root: Path = manifest.REPO_ROOT,
            files: Sequence[str] = manifest.PLUGIN_FILES, dry_run: bool = False) -> dict:
    """Copy the manifest files from ``source_root`` into ``orion_root`` and record them.

    Only adds: a target path that exists and is not an unedited file of a previous
    install is a conflict; all conflicts are reported in one :class:`InstallError`
    and nothing is written. Returns the install record (the planned one under ``dry_run``).
    """
    root = check_orion_root(orion_root)
    source_root = Path(source_root).resolve()
    if root == source_root:
        raise InstallError("target {} is the ORION-KD checkout itself; expected an ORION checkout".format(root))
    inside_root(root, manifest.RECORD_NAME, "write")
    record = load_record(root)
    actions, new_dirs, conflicts = plan_install(root, source_root, files, record)
    if conflicts:
        raise InstallError(
            "the ORION-KD overlay only adds files and never replaces one, but {} of its path(s) already "
            "exist in {}:\n  {}\nNothing was written. Is this the ORION checkout you meant? If these files "
            "are copies you made (or plugin files you edited), move them away and rerun."
            .format(len(conflicts), root, "\n  ".join(conflicts)))
    info("{}ORION-KD overlay: {} -> {}".format("[dry run] " if dry_run else "", source_root, root))
    for sub in new_dirs:
        info("  mkdir     {}/".format(sub))
    for act in actions:
        info("  {:<9} {}".format(act.kind, act.rel))
    result = record if record is not None else new_record(source_root)
    if dry_run:
        info("[dry run] nothing changed")
        return result

    result["source"] = str(source_root)
    result["installed_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    result["custom_imports"] = list(manifest.CUSTOM_IMPORTS)
    try:
        for sub in new_dirs:
            (root / sub).mkdir()
            result["created_dirs"].append(sub)
        for act in actions:
            if act.kind != "same":
                atomic_copy(source_root / act.rel, root / act.rel)
                result["files"][act.rel] = {"sha256": sha256_file(root / act.rel)}
                write_record(root, result)
    finally:
        write_record(root, result)
    info("recorded {} file(s) in {}".format(len(result["files"]), record_path(root)))
    return result


# --------------------------------------------------------------------------- uninstall
def _remove_stale_bytecode(path: Path) -> None:
    """Delete ``__pycache__/<stem>.*.pyc`` of a removed module, and the cache folder if it empties."""
    cache = path.parent / "__pycache__"
    if path.suffix != ".py" or not cache.is_dir():
        return
    removed = False
    for pyc in cache.iterdir():
        if pyc.name.startswith(path.stem + ".") and pyc.name.endswith(".pyc"):
            pyc.unlink()
            removed = True
    if removed and not any(cache.iterdir()):
        cache.rmdir()


def uninstall(orion_root: Path, dry_run: bool = False) -> List[str]:
    """Remove what the record lists and the folders the install created (when empty).

    Files edited since install are kept and reported (the record keeps listing them);
    returns their relative paths.
    """
    root = check_orion_root(orion_root)
    inside_root(root, manifest.RECORD_NAME, "remove")
    record = load_record(root)
    if record is None:
        raise InstallError("no install record {}: ORION-KD is not installed in {} (nothing to uninstall)".format(
            record_path(root), root))
    for rel in list(record["files"]) + list(record["created_dirs"]):
        inside_root(root, rel, "remove")
    info("{}ORION-KD uninstall from {}".format("[dry run] " if dry_run else "", root))
    kept = []  # type: List[str]
    files = record["files"]  # type: Dict[str, dict]
    for rel in sorted(files, reverse=True):
        dst = root / rel
        if dst.is_file() and sha256_file(dst) != files[rel]["sha256"]:
            warn("{} was edited since install: kept (delete it by hand, then rerun --uninstall)".format(rel))
            kept.append(rel)
            continue
        if dry_run:
            info("  remove    {}".format(rel))
            continue
        if dst.is_file():
            dst.unlink()
            _remove_stale_bytecode(dst)
            info("  removed   {}".format(rel))
        else:
            warn("{} is already gone".format(rel))
        del files[rel]
        write_record(root, record)
    kept_dirs = []  # type: List[str]
    for sub in sorted(record["created_dirs"], key=lambda s: -len(PurePosixPath(s).parts)):
        folder = root / sub
        if dry_run:
            info("  rmdir     {}/ (if empty)".format(sub))
            continue
        cache = folder / "__pycache__"
        if cache.is_dir() and not any(cache.iterdir()):
            cache.rmdir()
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            info("  rmdir     {}/".format(sub))
        elif folder.is_dir():
            warn("folder {}/ was created by the install but is not empty: kept".format(sub))
            kept_dirs.append(sub)
    if dry_run:
        info("[dry run] nothing changed")
        return kept
    if kept:
        record["created_dirs"] = [d for d in record["created_dirs"] if d in kept_dirs]
        write_record(root, record)
        info("kept {} edited file(s); the record {} still lists them".format(len(kept), record_path(root)))
    else:
        record_path(root).unlink()
        info("ORION-KD removed; install record deleted")
    return kept


# --------------------------------------------------------------------------- import check
_CHECK_SCRIPT = r"""
import importlib, json, os, sys, traceback
root = os.path.realpath(sys.argv[1])
modules = json.loads(sys.argv[2])
types = json.loads(sys.argv[3])
out = {"python": sys.version.split()[0], "files": {}, "missing_types": [], "error": None}
try:
    for name in ["mmcv"] + modules:
        out["files"][name] = os.path.realpath(getattr(importlib.import_module(name), "__file__", "") or "")
    for where, names in sorted(types.items()):
        module, _, attr = where.partition(":")
        registry = getattr(importlib.import_module(module), attr, None)
        for t in names:
            if registry is None or registry.get(t) is None:
                out["missing_types"].append("{} (in {})".format(t, where))
except BaseException:
    out["error"] = traceback.format_exc()
print("@@ORION_KD_IMPORT_CHECK@@" + json.dumps(out))
"""


def resolve_python(python: str) -> str:
    """Path of the interpreter ``python`` names (a path or a command on PATH)."""
    exe = shutil.which(python) or python
    if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
        raise InstallError("--python {}: expected an executable Python interpreter, found none".format(python))
    return exe


def check_imports(orion_root: Path, python: str = sys.executable,
                  modules: Sequence[str] = manifest.CUSTOM_IMPORTS,
                  timeout_s: float = DEFAULT_IMPORT_TIMEOUT_S) -> str:
    """Import ``modules`` with ``python`` in the ORION root and check their types register.

    Runs in a subprocess with bytecode writing off (the ORION tree is left
    untouched). Returns the interpreter's version; raises :class:`InstallError`.
    """
    root = Path(orion_root).resolve()
    exe = resolve_python(python)
    types = {}  # type: Dict[str, List[str]]
    for module in modules:
        types.setdefault(manifest.registry_of(module), []).extend(manifest.REGISTERED_TYPES.get(module, ()))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    cmd = [exe, "-B", "-c", _CHECK_SCRIPT, str(root), json.dumps(list(modules)), json.dumps(types)]
    try:
        proc = subprocess.run(cmd, cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InstallError("import check with {} did not finish within {:.0f} s".format(exe, timeout_s))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHECK_MARKER)]
    if not lines:
        raise InstallError("import check with {} failed (exit {}):\n{}".format(
            exe, proc.returncode, _tail(proc.stderr or proc.stdout)))
    out = json.loads(lines[-1][len(CHECK_MARKER):])
    if out["error"]:
        raise InstallError("the plugin does not import in {} with {} (Python {}):\n{}".format(
            root, exe, out["python"], _tail(out["error"])))
    for name, path in sorted(out["files"].items()):
        if not path.startswith(str(root) + os.sep):
            raise InstallError("import check: {} was imported from {}, expected a file under {} "
                               "(another package shadows ORION's)".format(name, path, root))
    if out["missing_types"]:
        raise InstallError("import check: {} not registered after importing {}"
                           .format(", ".join(out["missing_types"]), ", ".join(modules)))
    return str(out["python"])


def _tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``, indented."""
    return "\n".join("    " + ln for ln in text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Add the ORION-KD plugin files to an ORION checkout (never replacing one of ORION's), "
                    "or --uninstall them.")
    parser.add_argument("orion_root", type=Path, help="path to the ORION checkout (holds mmcv/ and adzoo/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    parser.add_argument("--uninstall", action="store_true",
                        help="remove exactly what the install record lists (files edited since are kept)")
    parser.add_argument("--python", default=sys.executable,
                        help="ORION's Python interpreter for the import check (default: this one)")
    parser.add_argument("--skip-import-check", action="store_true", help="do not import the plugin after install")
    parser.add_argument("--import-timeout", type=float, default=DEFAULT_IMPORT_TIMEOUT_S,
                        help="seconds the import check may take (default %(default)s)")
    parser.add_argument("--source", type=Path, default=None,
                        help="ORION-KD checkout to copy from (default: the one holding this script)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error such as a conflict, 1 I/O error)."""
    args = build_parser().parse_args(argv)
    try:
        if args.uninstall:
            uninstall(args.orion_root, dry_run=args.dry_run)
            return 0
        checking = not (args.dry_run or args.skip_import_check)
        python = resolve_python(args.python) if checking else args.python
        install(args.orion_root, source_root=args.source or manifest.REPO_ROOT, dry_run=args.dry_run)
        if not checking:
            info("import check skipped")
        else:
            info("checking that the plugin imports with {} ...".format(python))
            try:
                version = check_imports(args.orion_root, python=python, timeout_s=args.import_timeout)
            except InstallError as exc:
                raise InstallError("{}\nThe files stay installed: fix the environment and rerun, or remove "
                                   "them with --uninstall.".format(exc))
            types = [t for m in manifest.CUSTOM_IMPORTS for t in manifest.REGISTERED_TYPES[m]]
            info("import check ok (Python {}): {} registered".format(version, ", ".join(types)))
        info("ORION configs register the plugin with:")
        info(manifest.custom_imports_line())
        return 0
    except InstallError as exc:
        print("error: {}".format(exc), file=sys.stderr)
        return 2
    except OSError as exc:
        print("error: {} (on {})".format(exc.strerror or exc, exc.filename or "?"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
