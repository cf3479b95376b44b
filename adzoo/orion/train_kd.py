"""Entry point of the standalone ORION-KD training (the miniature world), with ORION's ``train.py`` command line.

    python adzoo/orion/train_kd.py CONFIG [--work-dir DIR] [--resume-from CKPT | --auto-resume]
        [--load-from CKPT] [--cfg-options k=v ...] [--launcher {none,pytorch}] [--seed N]
        [--deterministic] [--local-rank N]

Several processes: ``./adzoo/orion/orion_dist_train.sh CONFIG GPUS [args]``. It builds the
model and ``data.train`` from the config and runs the standalone loop
(``adzoo.orion.apis.kd_loop``); in an ORION checkout ORION's own launcher, ``train.py``
and runner train instead. User errors (missing files, bad config values, a teacher
checkpoint that does not fit) are printed as one ``error: ...`` line with exit status 2;
set ``ORION_KD_DEBUG=1`` for the full traceback.
"""
from __future__ import annotations

import argparse
import datetime
import os
import os.path as osp
import pickle
import random
import sys
import time
import traceback
from typing import Any, Callable, List, Mapping, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
    from tools.dependency_check import require_dependencies  # standard library only
    require_dependencies(__file__)  # one line with the fix when torch / mmengine is missing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mmcv.models.utils.checkpoint_io import load_checkpoint_file, remove_stale_temp_files, state_dict_of  # noqa: E402
from mmcv.models.utils.kd_config import KD_CONFIG_KEYS  # noqa: E402
from mmcv.models.utils.user_errors import (UserError, check_writable_dir, describe_os_error,  # noqa: E402
                                           is_file_system_error, load_config)
from mmcv.utils import Config, DictAction, get_dist_info, import_modules_from_strings, set_random_seed  # noqa: E402

USER_ERROR_EXIT = 2


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """ORION's train.py arguments."""
    parser = argparse.ArgumentParser(description="Train ORION with a pruned, distilled backbone (ORION-KD)")
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument("--resume-from", help="the checkpoint file to resume from")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume from latest.pth (or the newest checkpoint) in the work dir, if any")
    parser.add_argument("--load-from", help="the checkpoint file to load weights from (no optimizer state)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default=None,
                        help="override config settings, 'key=value' pairs (the key must exist in the config)")
    parser.add_argument("--launcher", choices=["none", "pytorch"], default="none", help="job launcher")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--deterministic", action="store_true", help="deterministic options for CUDNN")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=0)
    parser.add_argument("--validate-only", action="store_true",
                        help="check the config and the command line, then exit (the launcher runs this first)")
    args = parser.parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    if args.resume_from and args.auto_resume:
        parser.error("--resume-from and --auto-resume exclude each other")
    return args


def _describe(value: Any) -> str:
    return "{} {!r}".format(type(value).__name__, value)


def _compatible(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return not (isinstance(old, int) and isinstance(new, float) and not new.is_integer())
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return True
    if isinstance(old, Mapping):
        return isinstance(new, Mapping)
    return isinstance(new, type(old))


#: Mappings that accept documented keys their config file need not list: path -> {key: default}.
ACCEPTED_KEYS = {"model.kd_config": KD_CONFIG_KEYS}


def merge_cfg_options(cfg: Any, options: Optional[Mapping[str, Any]]) -> None:
    """Apply ``--cfg-options``; every key must exist and keep its value's type (int may widen to float).

    A key of ``ACCEPTED_KEYS`` (e.g. any ``kd_config`` key) may be set where the file leaves it at its default.
    """
    if not options:
        return
    for key, value in options.items():
        node: Any = cfg
        path: List[str] = []
        for part in key.split("."):
            if isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__")):
                accepted = ACCEPTED_KEYS.get(".".join(path), {})
                if part not in list(node.keys()) and part not in accepted:
                    known = ", ".join(sorted({str(k) for k in node.keys()} | set(accepted))[:20])
                    hint = "; KD settings live in model.kd_config: --cfg-options model.{}=...".format(key) \
                        if key.startswith("kd_config.") else ""
                    raise UserError("--cfg-options {}: unknown key '{}'{} (known keys there: {}){}".format(
                        key, part, " under '{}'".format(".".join(path)) if path else "", known, hint))
                node = node[part] if part in list(node.keys()) else accepted[part]  # a default is type-checked too
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise UserError("--cfg-options {}: '{}' holds {}, which has no key '{}'".format(
                    key, ".".join(path), _describe(node), part))
            path.append(part)
        if not _compatible(node, value):
            raise UserError("--cfg-options {}: the config holds {}, got {} of another type".format(
                key, _describe(node), _describe(value)))
        if isinstance(node, float) and isinstance(value, int) and not isinstance(value, bool):
            options[key] = float(value)  # type: ignore[index]
    cfg.merge_from_dict(dict(options))


def init_distributed(launcher: str) -> bool:
    """Initialise torch.distributed for ``--launcher pytorch`` (NCCL on CUDA, Gloo on CPU)."""
    if launcher == "none":
        return False
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise UserError("--launcher pytorch needs the environment variable {} (start the job with "
                            "adzoo/orion/orion_dist_train.sh or torchrun)".format(var))
    timeout = datetime.timedelta(seconds=float(os.environ.get("ORION_KD_DIST_TIMEOUT", 1800)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def _shared_seed(seed: Optional[int], distributed: bool) -> int:
    """``seed``, or a random one chosen by rank 0 and broadcast (ORION's behaviour)."""
    if seed is not None:
        return int(seed)
    value = random.SystemRandom().randint(0, 2 ** 31 - 1)
    if distributed:
        t = torch.tensor([value], dtype=torch.int64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        value = int(t.item())
    return value


def _build_datasets(cfg: Any) -> List[Any]:
    try:
        from mmcv.datasets import build_dataset
    except ImportError as exc:
        raise UserError("no dataset builder: 'from mmcv.datasets import build_dataset' failed ({})".format(exc))
    train_cfg = cfg.get("data", {}).get("train")
    if train_cfg is None:
        raise UserError("the config has no data.train")
    return [build_dataset(train_cfg)]


def prepare_config(args: argparse.Namespace) -> Any:
    """The config with the command line applied, checked as far as it can be before any process starts:
    config file, ``--cfg-options``, KD settings, files named, intervals, work dir writable."""
    cfg = load_config(args.config, Config.fromfile)
    merge_cfg_options(cfg, args.cfg_options)
    from mmcv.models.utils.kd_config import check_kd_config_copies
    check_kd_config_copies(cfg)
    if cfg.get("custom_imports", None):
        ci = cfg["custom_imports"]
        import_modules_from_strings(**ci) if isinstance(ci, Mapping) else import_modules_from_strings(ci)

    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.resume_from is not None:
        if not osp.isfile(args.resume_from):
            raise UserError("--resume-from: checkpoint not found: {}".format(args.resume_from))
        cfg.resume_from = args.resume_from
    if args.load_from is not None:
        if not osp.isfile(args.load_from):
            raise UserError("--load-from: checkpoint not found: {}".format(args.load_from))
        cfg.load_from = args.load_from
    cfg.auto_resume = bool(args.auto_resume or cfg.get("auto_resume", False))
    from adzoo.orion.apis.kd_loop import check_settings
    check_settings(cfg)
    work_dir = check_writable_dir(cfg.work_dir, "work dir", "pass --work-dir to a writable folder with free space")
    for path in remove_stale_temp_files(work_dir):  # before anything is loaded: a killed save may fill the disk
        print("removed {}, left by an interrupted run".format(path), flush=True)
    for key in ("resume_from", "load_from"):  # readable weights (memory-mapped, not read) before the model is built
        if cfg.get(key, None):
            state_dict_of(load_checkpoint_file(cfg[key]), cfg[key])
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, configure, build, train; returns the exit status."""
    args = parse_args(argv)
    cfg = prepare_config(args)
    if args.validate_only:
        return 0

    distributed = init_distributed(args.launcher)
    rank, world_size = get_dist_info()
    cfg.gpu_ids = [int(os.environ.get("LOCAL_RANK", 0))] if distributed else [0]
    seed = _shared_seed(args.seed if args.seed is not None else cfg.get("seed", None), distributed)
    set_random_seed(seed, deterministic=args.deterministic)
    cfg.seed = seed
    timestamp = time.strftime("%Y%m%d_%H%M%S", time.localtime())
    if distributed:  # one timestamp (one log file name) for all ranks
        holder = [timestamp]
        dist.broadcast_object_list(holder, src=0)
        timestamp = holder[0]

    from mmcv.models.builder import build_model
    from adzoo.orion.apis.kd_loop import train_kd

    model = build_model(cfg.model, train_cfg=cfg.get("train_cfg", None), test_cfg=cfg.get("test_cfg", None))
    if callable(getattr(model, "init_weights", None)):  # as ORION's train.py; OrionStudent's is a no-op
        model.init_weights()
    datasets = _build_datasets(cfg)
    # Seeded again: how many random numbers building the model draws (e.g. transformers' weight init, overwritten
    # by the checkpoint) differs between library versions; training's random stream must not depend on it.
    set_random_seed(seed, deterministic=args.deterministic)
    meta = dict(seed=seed, exp_name=osp.basename(args.config), config_file=osp.abspath(args.config))
    train_kd(model, datasets, cfg, distributed=distributed, timestamp=timestamp, meta=meta)
    return 0


def _user_error_types() -> tuple:
    types: List[type] = [UserError, OSError, ValueError, KeyError, ImportError, pickle.UnpicklingError]
    from adzoo.orion.apis.kd_loop import ConfigError
    from mmcv.runner.hooks.kd_hooks import KDRunError
    types.extend([ConfigError, KDRunError])
    return tuple(types)


def _failure_types() -> tuple:
    from mmcv.runner.hooks.nonfinite_guard import NonFiniteTrainingError
    return (NonFiniteTrainingError,)


def _rank_prefix() -> str:
    rank, world_size = get_dist_info()
    return "[rank {}] ".format(rank) if world_size > 1 else ""


def run(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` with the top-level error policy: user errors as one line (exit 2), bugs with a traceback."""
    return run_checked(lambda: main(argv))


def run_checked(function: Callable[[], int]) -> int:
    """``function()`` under the error policy of :func:`run`: one ``error:`` line and exit 2 for a user error,
    one line and exit 1 for a failed run (e.g. diverged), a traceback and exit 1 for a bug."""
    try:
        return function()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _failure_types() as exc:  # training went wrong (e.g. diverged): one line, exit 1
        if os.environ.get("ORION_KD_DEBUG"):
            raise
        print("{}error: {}".format(_rank_prefix(), " ".join(str(exc).split())), file=sys.stderr)
        return 1
    except _user_error_types() as exc:
        if os.environ.get("ORION_KD_DEBUG"):
            raise
        prefix = _rank_prefix()
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            if not is_file_system_error(exc):  # e.g. a connection reset by a dead peer: not the user's
                traceback.print_exc()
                return 1
            message = describe_os_error(exc)
        if isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler error" in message:  # torch's own text
            reason = [ln.strip() for ln in message.splitlines() if "WeightsUnpickler error" in ln]
            message = "cannot load a checkpoint with weights_only=True (it holds objects other than tensors and " \
                      "plain types): {}".format(reason[0])
        print("{}error: {}".format(prefix, " ".join(message.split()) or type(exc).__name__), file=sys.stderr)
        return USER_ERROR_EXIT
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(run())
