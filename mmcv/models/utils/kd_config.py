"""The ``kd_config`` of a KD run: its keys and defaults, their validation, and the alpha schedule.

One owner for every KD setting that OrionStudent, the runner hooks and the tools read. Alpha
weights the distillation loss, total = (1 - alpha) * task + alpha * distill, and is a pure
function of the iteration (so a resumed run continues the schedule where it stopped).

Plugin file: Python 3.8, torch 2.0-2.4, no mmengine.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

KD_CONFIG_KEYS = {
    "teacher_backbone_path": None,
    "distillation_alpha": None,
    "alpha_schedule": "step",
    "warmup_alpha": 0.8,
    "finetune_alpha": 0.6,
    "warmup_epochs": None,
    "warmup_iters": None,
    "distillation_temperature": 3.0,
    "feature_distill_weight": 0.5,
    "attention_distill_weight": 0.3,
    "output_distill_weight": 0.2,
    "vl_distill_weight": 0.0,
    "freeze_non_backbone": True,
    "frozen_parts_mode": "train",
    "pruning_ratio": None,
    "mlp_pruning_ratio": None,
    "head_selection": None,
    "teacher_dtype": None,
    "label_fraction": 1.0,
    "block_map": None,
}
FROZEN_PARTS_MODES = ("train", "eval")
DEFAULT_WARMUP_EPOCHS = 1
#: Values of ``kd_config.head_selection``: how a pruned student chooses its heads without a pruning_config.
HEAD_SELECTIONS = ("magnitude",)


class KDConfigError(ValueError):
    """A mistake in ``kd_config`` (reported by the entry point as one line)."""


def check_block_map(block_map: Any) -> Optional[Dict[int, int]]:
    """``kd_config.block_map`` as ``{teacher_block: kept_teacher_block}`` (ints; digit-string keys, as a JSON or
    ``--cfg-options`` round trip writes them, are read as ints), or None.

    Which teacher block a depth-pruned student's taps stand for (``eva_taps.resolve_block_maps``); the
    ranges, the kept blocks and the window/global kinds are checked when the student is built.
    """
    if block_map is None:
        return None
    if not isinstance(block_map, Mapping):
        raise KDConfigError("kd_config.block_map: expected a dict {{teacher_block: kept_teacher_block}}, got {!r}"
                            .format(block_map))
    out: Dict[int, int] = {}
    for key, value in block_map.items():
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, int) or isinstance(value, bool) or not isinstance(value, int):
            raise KDConfigError("kd_config.block_map: expected integer teacher block indices, got {!r}: {!r}"
                                .format(key, value))
        out[key] = value
    return out


def validate_kd_config(kd_config: Optional[Mapping]) -> Dict[str, Any]:
    """Check the alpha keys of ``kd_config``; return the schedule's settings with defaults filled in.

    Decided meaning (README_KD.md): alpha weights the distillation loss,
    total = (1 - alpha) * task + alpha * distill, and is a function of the iteration only.
    ``alpha_schedule='step'`` (default) uses ``warmup_alpha`` (0.8) during the warm-up and
    ``finetune_alpha`` (0.6) after it; the warm-up is ``warmup_iters`` iterations or
    ``warmup_epochs`` epochs (default 1, converted with the runner's iterations per epoch);
    give at most one of the two. ``alpha_schedule='constant'`` uses ``distillation_alpha``
    throughout. ``distillation_alpha`` together with the step schedule is rejected, because
    the original guide can be read both ways.
    """
    kd = dict(kd_config or {})
    schedule = kd.get("alpha_schedule", KD_CONFIG_KEYS["alpha_schedule"])
    if schedule not in ("step", "constant"):
        raise KDConfigError("kd_config.alpha_schedule must be one of {}, got {!r}".format(
            ", ".join(repr(s) for s in ("step", "constant")), schedule))
    out: Dict[str, Any] = dict(alpha_schedule=schedule)
    if schedule == "constant":
        if kd.get("distillation_alpha") is None:
            raise KDConfigError("kd_config.alpha_schedule='constant' needs kd_config.distillation_alpha "
                                "(the weight of the distillation loss for every iteration)")
        out["distillation_alpha"] = _check_alpha("distillation_alpha", kd["distillation_alpha"])
        return out
    if kd.get("distillation_alpha") is not None:
        raise KDConfigError(
            "kd_config has distillation_alpha={!r} together with alpha_schedule='step'. The original guide "
            "reads both ways: either a constant alpha for every iteration (set alpha_schedule='constant' and keep "
            "distillation_alpha) or the warmup/finetune schedule (remove distillation_alpha and set "
            "warmup_alpha/finetune_alpha/warmup_epochs, defaults 0.8/0.6/1)".format(kd["distillation_alpha"]))
    for key in ("warmup_alpha", "finetune_alpha"):
        out[key] = _check_alpha(key, kd.get(key, KD_CONFIG_KEYS[key]))
    iters, epochs = kd.get("warmup_iters"), kd.get("warmup_epochs")
    if iters is not None and epochs is not None:
        raise KDConfigError("kd_config gives warmup_iters={!r} and warmup_epochs={!r}; give one: the warm-up "
                            "length in iterations or in epochs".format(iters, epochs))
    if iters is not None:
        out["warmup_iters"] = _check_count("kd_config.warmup_iters", iters)
    else:
        out["warmup_epochs"] = _check_count("kd_config.warmup_epochs",
                                            DEFAULT_WARMUP_EPOCHS if epochs is None else epochs)
    return out


def _check_alpha(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise KDConfigError("kd_config.{} must be a number in [0, 1], got {!r}".format(name, value))
    return float(value)


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KDConfigError("{} must be an integer >= {}, got {!r}".format(name, minimum, value))
    return value


def warmup_iterations(kd_config: Optional[Mapping], iters_per_epoch: Optional[int] = None) -> int:
    """Length of the alpha warm-up in iterations (``warmup_epochs`` needs ``iters_per_epoch``)."""
    kd = validate_kd_config(kd_config)
    if kd["alpha_schedule"] == "constant":
        return 0
    if "warmup_iters" in kd:
        return kd["warmup_iters"]
    if kd["warmup_epochs"] == 0:
        return 0
    if iters_per_epoch is None:
        raise KDConfigError("kd_config.warmup_epochs={} counts epochs but no iters_per_epoch was given: set "
                            "KDAlphaScheduleHook(iters_per_epoch=...) (in ORION: num_iters_per_epoch) or give "
                            "kd_config.warmup_iters instead".format(kd["warmup_epochs"]))
    return kd["warmup_epochs"] * _check_count("iters_per_epoch", iters_per_epoch, minimum=1)


def resolve_distillation_alpha(kd_config: Optional[Mapping], iteration: int,
                               iters_per_epoch: Optional[int] = None) -> float:
    """Alpha for the 0-based ``iteration`` (see :func:`validate_kd_config`).

    A pure function of the iteration, so a resumed run continues the schedule exactly where it stopped.
    """
    kd = validate_kd_config(kd_config)
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError("iteration must be an integer >= 0, got {!r}".format(iteration))
    if kd["alpha_schedule"] == "constant":
        return kd["distillation_alpha"]
    in_warmup = iteration < warmup_iterations(kd, iters_per_epoch)
    return kd["warmup_alpha"] if in_warmup else kd["finetune_alpha"]


def resolve_kd_config(kd_config: Optional[Mapping[str, Any]], teacher_backbone_path: Optional[str] = None,
                      freeze_non_backbone: Optional[bool] = None) -> Dict[str, Any]:
    """``kd_config`` with defaults filled in and every key validated; OrionStudent's top-level
    ``teacher_backbone_path``/``freeze_non_backbone`` must agree with it when both are given."""
    given = dict(kd_config or {})
    unknown = sorted(set(given) - set(KD_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"kd_config: unknown key(s) {unknown}; expected some of {sorted(KD_CONFIG_KEYS)}")
    kd = {key: value for key, value in KD_CONFIG_KEYS.items() if value is not None}
    kd.update(given)
    for key, value in (("teacher_backbone_path", teacher_backbone_path),
                       ("freeze_non_backbone", freeze_non_backbone)):
        if value is None:
            continue
        if key in given and given[key] != value:
            raise ValueError(f"OrionStudent: {key} is {value!r} but kd_config.{key} is {given[key]!r}; "
                             f"give one value")
        kd[key] = value
    kd.update(validate_kd_config(kd))
    if kd["frozen_parts_mode"] not in FROZEN_PARTS_MODES:
        raise ValueError(f"kd_config.frozen_parts_mode: expected one of {FROZEN_PARTS_MODES} (the mode of the "
                         f"frozen neck/heads/LLM during KD), got {kd['frozen_parts_mode']!r}")
    if kd.get("teacher_dtype") not in (None, "fp32", "bf16", "fp16"):
        raise ValueError(f"kd_config.teacher_dtype: expected None, 'fp32', 'bf16' or 'fp16', got "
                         f"{kd['teacher_dtype']!r}")
    if kd.get("head_selection") not in (None,) + HEAD_SELECTIONS:
        raise ValueError(f"kd_config.head_selection: expected 'magnitude' or None, got {kd['head_selection']!r} "
                         f"(for the data-driven methods write a configuration with tools/head_pruning_utils.py "
                         f"and set model.pruning_config)")
    fraction = kd["label_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"kd_config.label_fraction: the fraction of training frames whose labels the task loss may "
                         f"use, a number in [0, 1], got {fraction!r} (1.0: all frames)")
    kd["label_fraction"] = float(fraction)
    if kd.get("block_map") is not None:
        kd["block_map"] = check_block_map(kd["block_map"])
    if kd["freeze_non_backbone"] is not True:
        raise ValueError("kd_config.freeze_non_backbone: only True is supported (backbone-only training)")
    return kd


#: ``CombinedKDLoss`` argument -> the ``kd_config`` key that owns its value.
LOSS_KEYS_IN_KD_CONFIG = {"temperature": "distillation_temperature", "feature_distill_weight": "feature_distill_weight",
                          "attention_distill_weight": "attention_distill_weight",
                          "output_distill_weight": "output_distill_weight", "vl_distill_weight": "vl_distill_weight"}
#: OrionStudent arguments that repeat a ``kd_config`` key.
MODEL_KEYS_IN_KD_CONFIG = ("teacher_backbone_path", "freeze_non_backbone")


def distillation_loss_config(kd: Dict[str, Any], given_kd: Optional[Mapping[str, Any]],
                             distillation_loss: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``CombinedKDLoss`` config; its temperature and weights are ``kd_config``'s.

    ``model.distillation_loss`` may give them too: a value that ``kd_config`` also gives must be
    equal (else :class:`KDConfigError`); one that only ``distillation_loss`` gives becomes ``kd``'s
    value as well, so the ``kd_config`` recorded in checkpoints is the one that trained.
    """
    loss_cfg: Dict[str, Any] = dict(type="CombinedKDLoss")
    loss_cfg.update({loss_key: kd[kd_key] for loss_key, kd_key in LOSS_KEYS_IN_KD_CONFIG.items()})
    given = dict(given_kd or {})
    for loss_key, value in dict(distillation_loss or {}).items():
        kd_key = LOSS_KEYS_IN_KD_CONFIG.get(loss_key)
        if kd_key is not None and kd_key in given and given[kd_key] != value:
            raise KDConfigError("model.distillation_loss.{}={!r} but model.kd_config.{}={!r}: give the value once, "
                                "in model.kd_config.{} (remove it from distillation_loss)".format(
                                    loss_key, value, kd_key, given[kd_key], kd_key))
        if kd_key is not None:
            kd[kd_key] = value
        loss_cfg[loss_key] = value
    return loss_cfg


def check_kd_config_copies(cfg: Mapping[str, Any]) -> None:
    """A config's top-level ``kd_config`` (if any) must agree with ``model.kd_config``, which the model reads.

    Raises :class:`KDConfigError` naming the first key whose values differ, so that an override
    of the top-level copy (``--cfg-options kd_config.pruning_ratio=...``) is never silently dropped.
    """
    top = cfg.get("kd_config", None)
    if top is None:
        return
    model = cfg.get("model", None) or {}
    own = dict(model.get("kd_config", None) or {})
    for key in sorted(top):
        if key in own:
            used = own[key]
        elif key in MODEL_KEYS_IN_KD_CONFIG and model.get(key, None) is not None:
            used = model.get(key)
        else:
            used = KD_CONFIG_KEYS.get(key)
        if top[key] != used:
            raise KDConfigError("kd_config.{0}={1!r} but model.kd_config.{0}={2!r}: the model reads model.kd_config "
                                "only; set model.kd_config.{0} (e.g. --cfg-options model.kd_config.{0}=...) or drop "
                                "the top-level kd_config".format(key, top[key], used))


__all__ = ["LOSS_KEYS_IN_KD_CONFIG", "MODEL_KEYS_IN_KD_CONFIG", "distillation_loss_config", "check_kd_config_copies",
           "KD_CONFIG_KEYS", "FROZEN_PARTS_MODES", "check_block_map", "HEAD_SELECTIONS", "DEFAULT_WARMUP_EPOCHS", "KDConfigError",
           "validate_kd_config", "warmup_iterations", "resolve_distillation_alpha", "resolve_kd_config"]
