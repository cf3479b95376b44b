"""Stop a run that was asked to resume but starts from iteration 0.

ORION's ``adzoo/orion/train.py`` sets ``cfg.resume_from`` only when ``--resume-from`` names an
existing file: a mistyped or not yet copied path is dropped without a word, and the run starts
over from iteration 0, the lr schedule and the distillation alpha schedule with it. The runner
never learns that a resume was asked for, so this hook reads the command line of the process
(every rank has the same one) at ``before_run``, after ORION's ``runner.resume``.
Plugin module: Python 3.8, torch 2.0-2.4, registries from ``mmcv``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

from mmcv.runner.hooks import HOOKS, Hook

#: The ``--cfg-options`` item that lets a run start over although a resume was asked for. ORION's ``Config``
#: adds it as a top-level key that nothing else reads; the hook reads it from the command line, as it reads
#: ``--resume-from``, so it works wherever the hook stands in ``custom_hooks``.
CONTINUE_OPTION = "allow_fresh_start=True"


def requested_resume(argv: Sequence[str]) -> Optional[str]:
    """The ``--resume-from`` path in ``argv`` (``--resume-from X``, ``--resume-from=X`` or a prefix), or None."""
    return _parse(argv).resume_from


def fresh_start_allowed(argv: Sequence[str]) -> bool:
    """Whether ``argv`` holds ``--cfg-options ... allow_fresh_start=True ...``."""
    options = _parse(argv).cfg_options or []
    return any(item.replace(" ", "").lower() in ("allow_fresh_start=true", "allow_fresh_start=1") for item in options)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--cfg-options", nargs="+", default=None)
    return parser.parse_known_args(list(argv))[0]


@HOOKS.register_module()
class ResumeCheckHook(Hook):
    """Before the run: a ``--resume-from`` that did not resume (iteration 0, no such file) stops it in one line.

    ``allow_fresh_start=True`` (or ``--cfg-options allow_fresh_start=True`` on the command line) logs the
    same line and trains from iteration 0. ``argv`` defaults to the process's arguments (``sys.argv[1:]``).
    """

    def __init__(self, allow_fresh_start: bool = False, argv: Optional[Sequence[str]] = None) -> None:
        self.allow_fresh_start = bool(allow_fresh_start)
        self.argv = None if argv is None else list(argv)

    def before_run(self, runner: Any) -> None:
        argv = sys.argv[1:] if self.argv is None else self.argv
        asked = requested_resume(argv)
        if asked is None or getattr(runner, "iter", 0) > 0 or os.path.isfile(asked):
            return
        message = ("ResumeCheckHook: --resume-from {} is not a file ({}), so ORION's train.py ignored it and this run "
                   "starts at iteration 0 with the lr and alpha schedules from the start".format(
                       asked, os.path.abspath(asked)))
        logger = getattr(runner, "logger", None)
        if self.allow_fresh_start or fresh_start_allowed(argv):
            if logger is not None:
                logger.warning(message + "; allow_fresh_start=True: training from iteration 0")
            return
        message += "; fix the path (checkpoints are in {}), or start over with --cfg-options {}".format(
            os.path.abspath(getattr(runner, "work_dir", None) or "."), CONTINUE_OPTION)
        raise SystemExit(message if getattr(runner, "rank", 0) == 0 else 1)


__all__ = ["CONTINUE_OPTION", "ResumeCheckHook", "fresh_start_allowed", "requested_resume"]
