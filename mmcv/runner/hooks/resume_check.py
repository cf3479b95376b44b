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

#: The ``--cfg-options`` item that lets a run start over although a resume was asked for; the stage-3 KD
#: config lists this hook first in ``custom_hooks``.
CONTINUE_OPTION = "custom_hooks.0.allow_fresh_start=True"


def requested_resume(argv: Sequence[str]) -> Optional[str]:
    """The ``--resume-from`` path in ``argv`` (``--resume-from X``, ``--resume-from=X`` or a prefix), or None."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--resume-from", default=None)
    known, _ = parser.parse_known_args(list(argv))
    return known.resume_from


@HOOKS.register_module()
class ResumeCheckHook(Hook):
    """Before the run: a ``--resume-from`` that did not resume (iteration 0, no such file) stops it in one line.

    ``allow_fresh_start=True`` logs the same line and trains from iteration 0. ``argv`` defaults to the
    process's arguments (``sys.argv[1:]``).
    """

    def __init__(self, allow_fresh_start: bool = False, argv: Optional[Sequence[str]] = None) -> None:
        self.allow_fresh_start = bool(allow_fresh_start)
        self.argv = None if argv is None else list(argv)

    def before_run(self, runner: Any) -> None:
        asked = requested_resume(sys.argv[1:] if self.argv is None else self.argv)
        if asked is None or getattr(runner, "iter", 0) > 0 or os.path.isfile(asked):
            return
        message = ("ResumeCheckHook: --resume-from {} is not a file ({}), so ORION's train.py ignored it and this run "
                   "starts at iteration 0 with the lr and alpha schedules from the start".format(
                       asked, os.path.abspath(asked)))
        logger = getattr(runner, "logger", None)
        if self.allow_fresh_start:
            if logger is not None:
                logger.warning(message + "; allow_fresh_start=True: training from iteration 0")
            return
        message += "; fix the path (checkpoints are in {}), or start over with --cfg-options {}".format(
            os.path.abspath(getattr(runner, "work_dir", None) or "."), CONTINUE_OPTION)
        raise SystemExit(message if getattr(runner, "rank", 0) == 0 else 1)


__all__ = ["CONTINUE_OPTION", "ResumeCheckHook", "requested_resume"]
