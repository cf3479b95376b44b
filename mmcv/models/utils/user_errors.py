"""Checks shared by the command-line entry points, each failing with one line that names the file or setting.

``UserError`` is what an entry point prints as ``error: ...`` (exit status 2). The checks run
before anything expensive (the teacher load, the process group, the first step): a config that
parses, a work dir that can be written, a rendezvous port that is free, an output file whose
folder can be written.

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine (``Config`` comes from the caller).
"""
from __future__ import annotations

import errno
import os
import socket
from typing import Any, Callable


class UserError(ValueError):
    """A mistake the user can fix (a file, a setting, an argument); printed as one line, exit status 2."""


def load_config(path: str, fromfile: Callable[[str], Any]) -> Any:
    """``fromfile(path)`` (``Config.fromfile``) with a missing file or a broken config turned into one line."""
    if not os.path.isfile(path):
        raise UserError("config file not found: {}".format(path))
    try:
        return fromfile(path)
    except SyntaxError as exc:
        where = exc.filename if exc.filename and exc.filename != "<unknown>" else path
        raise UserError("{}: syntax error at line {}: {}".format(where, exc.lineno, exc.msg)) from None
    except FileNotFoundError as exc:
        raise UserError("{}: a file it names does not exist: {}".format(path, exc.filename or exc)) from None
    except (NameError, TypeError, KeyError, AttributeError, ImportError) as exc:
        raise UserError("{}: cannot be read ({}: {})".format(path, type(exc).__name__, exc)) from None


def check_writable_dir(path: str, what: str, fix: str = "pass a writable folder") -> str:
    """Create ``path`` if needed and write (then delete) a probe file in it; returns the absolute path.

    Fails with one line when the folder cannot be created or written (read-only, no permission,
    no space left).
    """
    folder = os.path.abspath(path)
    probe = os.path.join(folder, ".orion_kd_write_probe.{}".format(os.getpid()))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError("{} {}: {} is a file, not a folder: {}".format(what, folder, existing, fix))
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise UserError("{} {} is not writable ({}): {}".format(what, folder, os.strerror(exc.errno or 0)
                                                                   if exc.errno else exc, fix)) from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return folder


def check_port_free(host: str, port: int) -> None:
    """Fail with one line when ``host:port`` (the rendezvous of rank 0) is already in use."""
    if not 0 < port < 65536:
        raise UserError("MASTER_PORT must be in 1..65535, got {}".format(port))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError("MASTER_PORT {} on {} is already in use (another job?): set MASTER_PORT to a free "
                                "port, e.g. MASTER_PORT={}".format(port, host, port + 1 if port < 65535 else 29500)) \
                    from None
            raise UserError("cannot bind MASTER_ADDR:MASTER_PORT {}:{} ({}): on node 0 MASTER_ADDR must be this "
                            "machine".format(host, port, exc.strerror or exc)) from None


_FILE_SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOTDIR,
                      errno.EISDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG)


def is_file_system_error(exc: OSError) -> bool:
    """True for an ``OSError`` about a file or the disk (a user can fix it), not e.g. a dropped connection."""
    return exc.errno in _FILE_SYSTEM_ERRNOS


def describe_os_error(exc: OSError) -> str:
    """An ``OSError`` as one line: the file, what failed and the usual fix."""
    name = exc.filename or ""
    reason = exc.strerror or str(exc)
    fix = {errno.ENOSPC: "free disk space or pass another --work-dir", errno.EDQUOT: "free disk space",
           errno.EROFS: "pass a writable --work-dir", errno.EACCES: "check the permissions or pass another path",
           errno.EFBIG: "the file system refuses files this large: free space or use another folder"}.get(exc.errno)
    return "{}{}{}".format("{}: ".format(name) if name else "", reason, "; {}".format(fix) if fix else "")


__all__ = ["UserError", "load_config", "check_writable_dir", "check_port_free", "is_file_system_error",
           "describe_os_error"]
