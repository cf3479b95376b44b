"""Setup checks that only an ORION checkout needs: what stops an 8-GPU run before it starts.

Used by ``tools/kd_setup_check.py`` when the current folder is an ORION checkout. Each check reads
ORION's config as ORION's ``Config`` loaded it (never a copy of it), or a file of the checkout,
and returns ``Check`` lines: every data and checkpoint path the config opens, the installed plugin
against the ORION-KD repository it came from, the visible GPUs against the config's ``num_gpus``,
flash-attn when the config asks for it, and ORION's launcher (``adzoo/orion/orion_dist_train.sh``).
Plugin file: Python 3.8; torch is imported only by the GPU check.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from tools.kd_setup_check import FAIL, PASS, WARN, Check

LAUNCHER = "adzoo/orion/orion_dist_train.sh"
INSTALL_RECORD = ".orion_kd_install.json"
#: Config keys whose string value is a file or folder the run reads (outputs such as save_path are not).
INPUT_KEYS = ("data_root", "img_root", "map_root", "ann_file", "map_file", "base_desc_path", "tokenizer", "lm_head",
              "load_from", "resume_from", "pretrained", "pruning_config")
#: Where ORION's README says each input comes from (path prefix -> fix).
SOURCES = (
    ("data/chat-B2D", "unzip ORION's Chat-B2D.zip into data/ (ORION's README, Train): data/chat-B2D/ is lower case"),
    ("data/bench2drive", "prepare the Bench2Drive dataset under data/bench2drive/ with its maps/ (ORION's README, "
                         "Preparation)"),
    ("data/infos", "write data/infos/b2d_infos_train.pkl, b2d_infos_val.pkl and b2d_map_infos.pkl with "
                   "Bench2Drive's data preparation (ORION's README, Preparation)"),
    ("ckpts/pretrain_qformer", "download ORION's pretrained 2D LLM weights (pretrain_qformer) into "
                               "ckpts/pretrain_qformer/ (ORION's README, Preparation)"),
)


def _walk(node: Any, prefix: str = "") -> Iterator[Tuple[str, str, Any]]:
    """(dotted key, last key, value) of every leaf of nested dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, "{}.{}".format(prefix, key) if prefix else str(key))
            if not isinstance(value, (dict, list, tuple)):
                yield "{}.{}".format(prefix, key) if prefix else str(key), str(key), value
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _walk(value, "{}.{}".format(prefix, index))


def config_input_paths(cfg: Any) -> Dict[str, List[str]]:
    """Every input path the config names (normalised) -> the config keys that name it, in config order."""
    found = {}  # type: Dict[str, List[str]]
    for dotted, key, value in _walk(getattr(cfg, "_cfg_dict", cfg)):
        if key in INPUT_KEYS and isinstance(value, str) and value and "://" not in value:
            found.setdefault(os.path.normpath(value), []).append(dotted)
    return found


def _fix_for(path: str) -> str:
    for prefix, fix in SOURCES:
        if path == prefix or path.startswith(prefix + "/"):
            return fix
    return "create it, or point the config key at it (--cfg-options KEY=PATH)"


def check_input_paths(cfg: Any) -> List[Check]:
    """One line per input path: PASS when it exists, FAIL naming the keys that read it and where it comes from."""
    lines = []
    for path, keys in sorted(config_input_paths(cfg).items()):
        keys = sorted(keys, key=lambda k: (not k.startswith(("data.", "model.")), "." not in k))  # used, then set
        where = keys[0] + (" and {} more".format(len(keys) - 1) if len(keys) > 1 else "")
        if os.path.exists(path):
            lines.append(Check("path", PASS, "{} (read by {})".format(path, where)))
        else:
            lines.append(Check("path", FAIL, "not found: {} (read by {})".format(path, where), _fix_for(path)))
    return lines


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_installed_plugin(root: str) -> Check:
    """The installed plugin files against the install record and the ORION-KD repository they came from."""
    record_path = os.path.join(root, INSTALL_RECORD)
    try:
        with open(record_path) as handle:
            record = json.load(handle)
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Check("plugin_files", FAIL, "{}: unreadable install record ({})".format(record_path, exc),
                     "reinstall from ORION-KD: python tools/install_into_orion.py {} --python {}".format(
                         os.path.abspath(root), sys.executable))
    source = str(record.get("source") or "")
    reinstall = "python {} {} --python {}".format(os.path.join(source or "ORION-KD", "tools/install_into_orion.py"),
                                                  os.path.abspath(root), sys.executable)
    missing = [rel for rel in files if not os.path.isfile(os.path.join(root, rel))]
    edited = [rel for rel in files if rel not in missing and _sha256(os.path.join(root, rel)) != files[rel]["sha256"]]
    if missing:
        return Check("plugin_files", FAIL, "{} installed file(s) missing, e.g. {}".format(len(missing), missing[:2]),
                     reinstall)
    if not os.path.isdir(source):
        return Check("plugin_files", WARN, "{} files installed {} from {}, which is not here: cannot compare "
                     "versions".format(len(files), record.get("installed_at"), source or "?"),
                     "" if not edited else "{} edited since install, e.g. {}".format(len(edited), edited[:2]))
    stale = [rel for rel in files if not os.path.isfile(os.path.join(source, rel))
             or _sha256(os.path.join(source, rel)) != files[rel]["sha256"]]
    if stale or edited:
        detail = "{} of {} installed files differ from the ORION-KD repository {} (e.g. {}){}".format(
            len(set(stale) | set(edited)), len(files), source, sorted(set(stale) | set(edited))[:2],
            "; {} edited here since install".format(len(edited)) if edited else "")
        return Check("plugin_files", WARN, detail, "update the installed plugin: " + reinstall)
    return Check("plugin_files", PASS, "{} files installed {}, identical to the ORION-KD repository {}".format(
        len(files), record.get("installed_at"), source))


def check_gpus(cfg: Any) -> Check:
    """Visible CUDA GPUs against the config's num_gpus, and what ORION's 'epoch' then covers."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    num_gpus, per_gpu = cfg.get("num_gpus"), (cfg.get("data") or {}).get("samples_per_gpu")
    per_epoch = cfg.get("num_iters_per_epoch")
    if visible == 0:
        return Check("gpus", FAIL, "no CUDA GPU visible to {} (the config assumes num_gpus={})".format(
            sys.executable, num_gpus), "run on the GPU machine, in ORION's CUDA environment (check "
                                       "CUDA_VISIBLE_DEVICES and nvidia-smi)")
    if not (isinstance(num_gpus, int) and isinstance(per_epoch, int) and isinstance(per_gpu, int)):
        return Check("gpus", PASS, "{} CUDA GPU(s) visible".format(visible))
    detail = "{} CUDA GPU(s) visible; the config's num_iters_per_epoch={} was computed for num_gpus={} x {} " \
             "samples".format(visible, per_epoch, num_gpus, per_gpu)
    if visible == num_gpus:
        return Check("gpus", PASS, detail)
    return Check("gpus", WARN, detail + ": on {} GPU(s) one such 'epoch' reads {} samples, {:.0%} of one on {}".format(
        visible, per_epoch * visible * per_gpu, visible / float(num_gpus), num_gpus),
        "count the run in iterations (runner.max_iters, checkpoint_config.interval) for the GPUs you launch with")


def check_flash_attn(cfg: Any) -> Optional[Check]:
    """flash-attn importable when any module of the config sets flash_attn=True; None when none does."""
    keys = [dotted for dotted, key, value in _walk(getattr(cfg, "_cfg_dict", cfg))
            if key == "flash_attn" and value is True]
    if not keys:
        return None
    where = keys[0] + (" and {} more".format(len(keys) - 1) if len(keys) > 1 else "")
    if importlib.util.find_spec("flash_attn") is None:
        return Check("flash_attn", FAIL, "flash_attn=True ({}) but flash-attn is not importable".format(where),
                     "pip install flash-attn --no-build-isolation in ORION's environment (its requirements)")
    return Check("flash_attn", PASS, "importable; flash_attn=True in {}".format(where))


def check_launcher(root: str) -> List[Check]:
    """ORION's launcher exists, how to start it, and which ``python`` it will run."""
    path = os.path.join(root, LAUNCHER)
    if not os.path.isfile(path):
        return [Check("launcher", FAIL, "{} not found".format(LAUNCHER), "run from the root of the ORION checkout")]
    if shutil.which("bash") is None:
        lines = [Check("launcher", FAIL, "{} needs bash, which is not on PATH".format(LAUNCHER), "install bash")]
    elif os.access(path, os.X_OK):
        lines = [Check("launcher", PASS, "{} is executable (or start it with bash)".format(LAUNCHER))]
    else:
        lines = [Check("launcher", WARN, "{} has no executable bit (as ORION stores it): ./{} fails with "
                       "'Permission denied'".format(LAUNCHER, LAUNCHER),
                       "start it with bash: bash {} CONFIG GPUS (or chmod +x it once)".format(LAUNCHER))]
    python = shutil.which("python")
    if python is None:
        lines.append(Check("launcher", FAIL, "the launcher runs `python -m torch.distributed.launch`, and no "
                           "`python` is on PATH", "activate ORION's environment (conda activate orion)"))
    elif os.path.realpath(python) != os.path.realpath(sys.executable):
        lines.append(Check("launcher", WARN, "the launcher runs `python` = {}, not this interpreter ({})".format(
            python, sys.executable), "activate the environment you checked with, so that `python` is its interpreter"))
    return lines


def launcher_work_dir(config_path: str) -> str:
    """The --work-dir ORION's launcher appends: the config path without .py, 'configs' replaced by 'work_dirs'."""
    return os.path.splitext(config_path)[0].replace("configs", "work_dirs") + "/"


__all__ = ["INPUT_KEYS", "LAUNCHER", "check_flash_attn", "check_gpus", "check_input_paths", "check_installed_plugin",
           "check_launcher", "config_input_paths", "launcher_work_dir"]
