"""What ``orion_dist_train.sh`` runs: check the job on this node, then torchrun the training processes.

    python adzoo/orion/launch.py TORCHRUN_ARGS... -- adzoo/orion/train_kd.py CONFIG [train_kd.py args]

Before any process starts it checks what a user can get wrong: the config and the command line
(``train_kd.py --validate-only``'s checks, in this process) and, on node 0, that
``--master_addr:--master_port`` is free. Then it runs torchrun's ``run`` directly (not its ``main``,
whose error handler prints a 30-line summary of a child's failure) and exits with the children's
status: 2 when a child stopped on a user error (it printed its one-line ``error:``), else the
first failure's status. Standalone only (not part of the overlay).
"""
from __future__ import annotations

import os.path as osp
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

from adzoo.orion.train_kd import USER_ERROR_EXIT, parse_args, prepare_config, run_checked  # noqa: E402
from mmcv.models.utils.user_errors import check_port_free  # noqa: E402


def _children_status(failures: dict) -> int:
    codes = [getattr(failure, "exitcode", 1) for _, failure in sorted(failures.items())]
    if USER_ERROR_EXIT in codes:
        return USER_ERROR_EXIT
    positive = [code for code in codes if code and code > 0]
    return positive[0] if positive else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Check, then launch; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print("error: usage: launch.py TORCHRUN_ARGS... -- SCRIPT CONFIG [args]", file=sys.stderr)
        return USER_ERROR_EXIT
    split = argv.index("--")
    script_argv = argv[split + 1:]
    from torch.distributed.run import get_args_parser, run

    torchrun_args = get_args_parser().parse_args(argv[:split] + script_argv)

    def check() -> int:
        prepare_config(parse_args(script_argv[1:]))
        if int(torchrun_args.node_rank) == 0:
            check_port_free(torchrun_args.master_addr, int(torchrun_args.master_port))
        return 0

    status = run_checked(check)
    if status != 0:
        return status
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    try:
        run(torchrun_args)
    except ChildFailedError as exc:
        return _children_status(exc.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
