"""Runner hooks for a knowledge-distillation run: what KD needs from the runner, one job per hook.

In an ORION checkout ORION's own ``custom_train_model`` builds every entry of ``cfg.custom_hooks``
from the hook registry and its ``IterBasedRunner`` calls them; the standalone loop does the same.
The KD configs list:

* ``KDCheckHook``: before the run, removes the temporary files a killed save left in ``work_dir``
  (rank 0), and fails with one clear message unless the model is an
  ``OrionStudent`` whose trainable parameters are exactly ``img_backbone.*`` and whose teacher is
  outside the state dict, the parameters (so DDP) and the optimizer; at the first iteration, that
  the frozen parts are in the mode ``kd_config.frozen_parts_mode`` asks for.
* ``KDAlphaScheduleHook``: before every iteration, sets the distillation alpha from
  ``runner.iter`` (a pure function of the iteration, so a resumed run continues the schedule
  where it stopped) and logs it.
* ``NonFiniteGuardHook`` (``mmcv/runner/hooks/nonfinite_guard.py``, registered with these): skips a
  step whose loss or gradient norm is non-finite and stops the run after a few in a row.
* ``KDLrLogHook``: logs ``lr_top`` and ``lr_base`` beside ORION's ``lr`` (its first parameter
  group's, the lowest layer's under layer-wise decay).
* ``KDExportStudentHook``: after the run, rank 0 writes the exported student (ORION checkpoint,
  backbone safetensors, and an inference config for ORION's test.py) into ``work_dir``, atomically.

Hooks read only these runner attributes: ``iter``, ``model`` (maybe wrapped: ``.module``),
``optimizer``, ``work_dir``, ``logger``, ``rank``, ``outputs`` and ``log_buffer``.
Plugin module: Python 3.8, torch 2.0-2.4, registries from ``mmcv`` (ORION's, mmcv 1.x or the light core).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

from mmcv.models.detectors.orion_student import TRAINABLE_PREFIX, TRAINING_CHILDREN, OrionStudent
from mmcv.models.utils.kd_config import resolve_distillation_alpha
from mmcv.models.utils.checkpoint_io import atomic_write_text, remove_stale_temp_files
from mmcv.models.utils.unwrap import unwrap_model
from mmcv.runner.hooks import HOOKS, Hook
from mmcv.runner.hooks.nonfinite_guard import NonFiniteGuardHook  # noqa: F401  (registers it with the KD hooks)

class KDRunError(RuntimeError):
    """The run is not the backbone-only KD run the config describes (one line, with the fix)."""


def student_of(runner: Any, hook: str) -> OrionStudent:
    """``runner.model`` unwrapped, which must be an ``OrionStudent``."""
    model = unwrap_model(runner.model)
    if not isinstance(model, OrionStudent):
        raise KDRunError("{}: runner.model is {}, expected an OrionStudent (config: model.type='OrionStudent')"
                         .format(hook, type(model).__name__))
    return model


def _log(runner: Any, message: str) -> None:
    logger = getattr(runner, "logger", None)
    if logger is not None:
        logger.info(message)


def run_epoch_length(runner: Any) -> Optional[Dict[str, int]]:
    """This run's epoch, from its training data loader and world size, or None where the runner has no loader.

    ``iters`` is ``samples // (per_gpu * world_size)``, as ORION's configs count an epoch
    (``num_iters_per_epoch``); ``iters_ceil`` also counts a last, partial batch. ORION's runner
    (and mmcv's) sets ``runner.data_loader`` before the first ``before_train_iter``; the standalone
    loop before ``before_run``.
    """
    loader = getattr(runner, "data_loader", None)
    loader = getattr(loader, "_dataloader", loader)  # mmcv's IterLoader wraps the DataLoader
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return None
    per_gpu = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if not per_gpu:
        return None
    world = int(getattr(runner, "world_size", 1) or 1)
    samples = len(dataset)
    return dict(samples=samples, per_gpu=int(per_gpu), world_size=world, iters=samples // (per_gpu * world),
                iters_ceil=-(-samples // (per_gpu * world)))


def epoch_mismatch_message(configured: int, run: Mapping[str, int], max_iters: Optional[int]) -> str:
    """One line: the config's epoch differs from the run's, with the ``--cfg-options`` that make them agree."""
    iters = max(1, run["iters"])
    options = ["num_iters_per_epoch={}".format(iters)]
    epochs = max_iters // configured if max_iters and max_iters % configured == 0 else None
    if epochs:
        options.append("runner.max_iters={}".format(epochs * iters))
    options += ["checkpoint_config.interval={}".format(iters), "data.shuffler_sampler.num_iters_to_seq={}".format(iters)]
    if epochs:  # ORION's stage 3: after the last epoch, i.e. no evaluation during the run
        options.append("evaluation.interval={}".format((epochs + 1) * iters))
    options.append("custom_hooks.1.iters_per_epoch={}".format(iters))
    return ("KDAlphaScheduleHook: an epoch of this run is {} iterations ({} samples / ({} per GPU x {} processes)) "
            "but the config counts {} (num_iters_per_epoch, computed when the config file ran, for another number "
            "of GPUs), so the alpha warm-up, the run length and the checkpoint interval would count other epochs; "
            "start again with --cfg-options {} (custom_hooks.1: KDAlphaScheduleHook's place in the list)".format(
                iters, run["samples"], run["per_gpu"], run["world_size"], configured, " ".join(options)))


@HOOKS.register_module()
class KDAlphaScheduleHook(Hook):
    """Sets ``model.set_distillation_alpha(alpha(runner.iter))`` before every training iteration.

    Args:
        iters_per_epoch: the config's epoch in iterations (ORION: ``num_iters_per_epoch``, which its
            run length, checkpoint interval and sampler count too). Before the first step it must
            agree with the run's epoch (:func:`run_epoch_length`: data loader and world size), else the
            run stops with one line giving the ``--cfg-options`` that fix it. None: the run's epoch
            is used (``kd_config.warmup_epochs`` then follows the real run).
    """

    def __init__(self, iters_per_epoch: Optional[int] = None) -> None:
        if iters_per_epoch is not None and (isinstance(iters_per_epoch, bool) or not isinstance(iters_per_epoch, int)
                                            or iters_per_epoch < 1):
            raise KDRunError("KDAlphaScheduleHook: iters_per_epoch must be a positive integer or None, got {!r}"
                             .format(iters_per_epoch))
        self.configured = iters_per_epoch
        self.iters_per_epoch = iters_per_epoch
        self.alpha: Optional[float] = None
        self._checked = False

    def alpha_at(self, runner: Any) -> float:
        """Alpha for the runner's current iteration."""
        student = student_of(runner, type(self).__name__)
        return resolve_distillation_alpha(student.kd_config, int(runner.iter), self.iters_per_epoch)

    def _check_epoch(self, runner: Any) -> None:
        """Take the run's epoch (or check the config's against it) once the data loader is known."""
        if self._checked:
            return
        run = run_epoch_length(runner)
        if run is None:
            return
        self._checked = True
        if self.configured is None:
            self.iters_per_epoch = max(1, run["iters"])
        elif self.configured not in (run["iters"], run["iters_ceil"]):
            raise KDRunError(epoch_mismatch_message(self.configured, run, getattr(runner, "max_iters", None)))
        _log(runner, "KDAlphaScheduleHook: an epoch is {} iterations ({} samples / ({} per GPU x {} processes))"
                     .format(self.iters_per_epoch, run["samples"], run["per_gpu"], run["world_size"]))

    def before_run(self, runner: Any) -> None:
        self._check_epoch(runner)
        student = student_of(runner, type(self).__name__)
        kd = {k: v for k, v in student.kd_config.items() if "alpha" in k or k.startswith("warmup")}
        if self.iters_per_epoch is None and kd.get("warmup_epochs") and run_epoch_length(runner) is None:
            _log(runner, "KD alpha schedule: {} (epochs: from the data loader at the first iteration)".format(kd))
            return
        alpha = self.alpha_at(runner)  # a schedule that cannot be resolved fails here, before any step
        _log(runner, "KD alpha schedule: {} (iteration {}: alpha {})".format(kd, runner.iter, alpha))

    def before_train_iter(self, runner: Any) -> None:
        self._check_epoch(runner)
        self.alpha = self.alpha_at(runner)
        student_of(runner, type(self).__name__).set_distillation_alpha(self.alpha)

    def after_train_iter(self, runner: Any) -> None:
        outputs = getattr(runner, "outputs", None) or {}
        if self.alpha is not None and "alpha" not in outputs.get("log_vars", {}):
            runner.log_buffer.update({"alpha": self.alpha}, outputs.get("num_samples", 1))


@HOOKS.register_module()
class KDLrLogHook(Hook):
    """Logs the lr the trained layers get, beside ORION's ``lr`` (the first parameter group's).

    With layer-wise decay and only the backbone trainable, ORION's first group is the lowest layer
    (about 0.07x the base lr). This hook adds ``lr_top``: the highest lr of any group (the top trained
    block's), and ``lr_base``: that lr divided by its group's ``lr_scale`` (the layer-decay
    constructors store it), i.e. ``optimizer.lr`` as the schedule has it now. Means over the log interval.
    """

    def after_train_iter(self, runner: Any) -> None:
        optimizers = runner.optimizer.values() if isinstance(runner.optimizer, dict) else [runner.optimizer]
        groups = [g for opt in optimizers if opt is not None for g in opt.param_groups if g["params"]]
        if not groups:
            return
        top = max(groups, key=lambda group: group["lr"])
        values = {"lr_top": float(top["lr"])}
        if top.get("lr_scale"):
            values["lr_base"] = float(top["lr"]) / float(top["lr_scale"])
        runner.log_buffer.update(values)


@HOOKS.register_module()
class KDCheckHook(Hook):
    """Fails before training starts when the run would not be backbone-only KD from a hidden teacher."""

    def __init__(self) -> None:
        self._mode_checked = False

    def before_run(self, runner: Any) -> None:
        student = student_of(runner, "KDCheckHook")
        if getattr(runner, "rank", 0) == 0 and getattr(runner, "work_dir", None):
            for path in remove_stale_temp_files(runner.work_dir):  # a killed save leaves GBs behind
                _log(runner, "KDCheckHook: removed {}, left by an interrupted run".format(path))
        self._check_trainable(student)
        teacher = _tensor_ids(student.teacher_backbone.parameters())
        teacher.update(_tensor_ids(student.teacher_backbone.buffers()))
        if teacher & _tensor_ids(runner.model.parameters()):
            raise KDRunError("KDCheckHook: the teacher backbone's parameters are among the model's parameters "
                             "(DDP would synchronise them); it must be held outside the module tree")
        in_state = sorted(k for k, v in runner.model.state_dict().items() if _tensor_id(v) in teacher)
        if in_state:
            raise KDRunError("KDCheckHook: teacher tensors are in the model's state dict (e.g. {}); checkpoints "
                             "must hold the student only".format(in_state[:3]))
        self._check_optimizer(runner, student, teacher)
        _log(runner, "KDCheckHook: OrionStudent, {} trainable img_backbone tensors, teacher outside the state "
                     "dict / parameters / optimizer, frozen parts in {} mode".format(
                         sum(1 for p in student.parameters() if p.requires_grad),
                         student.kd_config["frozen_parts_mode"]))

    def before_train_iter(self, runner: Any) -> None:
        if self._mode_checked:
            return
        self._mode_checked = True
        student = student_of(runner, "KDCheckHook")
        want_training = student.training and student.kd_config["frozen_parts_mode"] == "train"
        wrong = [name for name, child in student.named_children()
                 if name not in TRAINING_CHILDREN and child.training != want_training]
        if wrong:
            raise KDRunError("KDCheckHook: frozen parts {} are in {} mode, but kd_config.frozen_parts_mode={!r} asks "
                             "for {} mode".format(wrong, "eval" if want_training else "training",
                                                  student.kd_config["frozen_parts_mode"],
                                                  "training" if want_training else "eval"))
        if any(m.training for m in student.teacher_backbone.modules()):
            raise KDRunError("KDCheckHook: the teacher backbone is in training mode; it must stay in eval mode")

    @staticmethod
    def _check_trainable(student: OrionStudent) -> None:
        trainable = [name for name, param in student.named_parameters() if param.requires_grad]
        outside = [name for name in trainable if not name.startswith(TRAINABLE_PREFIX)]
        if outside:
            raise KDRunError("KDCheckHook: {} parameter(s) outside img_backbone require gradients (e.g. {}); only "
                             "the student backbone may train (kd_config.freeze_non_backbone=True)".format(
                                 len(outside), outside[:3]))
        if not trainable:
            raise KDRunError("KDCheckHook: no img_backbone parameter requires gradients; nothing would train "
                             "(is img_backbone built with frozen=True?)")

    @staticmethod
    def _check_optimizer(runner: Any, student: OrionStudent, teacher: set) -> None:
        names = {_tensor_id(p): n for n, p in student.named_parameters()}
        optimizers = runner.optimizer.values() if isinstance(runner.optimizer, dict) else [runner.optimizer]
        params = [p for opt in optimizers if opt is not None for g in opt.param_groups for p in g["params"]]
        if any(_tensor_id(p) in teacher for p in params):
            raise KDRunError("KDCheckHook: the optimizer holds teacher parameters; build it from the model "
                             "(the teacher is not among model.parameters())")
        stray = sorted(names.get(_tensor_id(p), "<not a model parameter>") for p in params
                       if p.requires_grad and not names.get(_tensor_id(p), "").startswith(TRAINABLE_PREFIX))
        if stray:
            raise KDRunError("KDCheckHook: the optimizer would update {} tensor(s) outside img_backbone (e.g. {})"
                             .format(len(stray), stray[:3]))


def _tensor_id(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (a state-dict entry shares it with its parameter)."""
    return tensor.data_ptr() if tensor.numel() else id(tensor)


def _tensor_ids(tensors: Iterator[torch.Tensor]) -> set:
    return {_tensor_id(t) for t in tensors}


@HOOKS.register_module()
class KDExportStudentHook(Hook):
    """After the run, rank 0 exports the student (no teacher) into ``work_dir``.

    Writes ``work_dir/<filename>`` (an ORION checkpoint: ``meta`` with the pruning configuration,
    ``state_dict``), with ``backbone_safetensors`` also ``<stem>_backbone.safetensors``, and, when
    ``inference_config`` exists (a path relative to where training runs: ORION's root), the
    inference config ``<stem>_infer.py``: it inherits ``inference_config`` and sets ``img_backbone``
    to the trained student's exact configuration (kept heads included), so that the checkpoint
    matches the model ORION's test.py builds key for key (its loader is non-strict; a backbone that
    keeps other heads still stops the load). With ``onnx`` the backbone also goes to
    ``<stem>_backbone.onnx`` (opset ``onnx_opset``, checked in ONNX Runtime, with a sidecar JSON;
    ``tools/export_onnx.py``), whose dependencies are checked when the hook is built, before training.
    Every file is written atomically.
    """

    def __init__(self, filename: str = "student_pruned.pth", backbone_safetensors: bool = True,
                 inference_config: Optional[str] = "adzoo/orion/configs/orion_stage3_kd_infer.py",
                 onnx: bool = False, onnx_opset: Optional[int] = None) -> None:
        if not isinstance(filename, str) or not filename.endswith(".pth") or os.path.isabs(filename) \
                or ".." in filename.replace("\\", "/").split("/"):
            raise KDRunError("KDExportStudentHook: filename must be a relative *.pth path inside work_dir, got {!r}"
                             .format(filename))
        self.filename = filename
        self.backbone_safetensors = bool(backbone_safetensors)
        self.inference_config = inference_config
        self.onnx_export = _onnx_exporter(onnx_opset) if onnx else None
        self.written: Dict[str, str] = {}

    def after_run(self, runner: Any) -> None:
        if getattr(runner, "rank", 0) != 0:
            return
        student = student_of(runner, "KDExportStudentHook")
        path = os.path.join(runner.work_dir, self.filename)
        self.written = dict(student.export_student(path, backbone_safetensors=self.backbone_safetensors))
        if self.inference_config and os.path.isfile(self.inference_config):
            self.written["inference_config"] = write_inference_config(
                os.path.splitext(path)[0] + "_infer.py", os.path.abspath(self.inference_config),
                dict(student.student_backbone_cfg), path)
        elif self.inference_config:
            _log(runner, "KDExportStudentHook: no {} here: no inference config written".format(self.inference_config))
        if self.onnx_export is not None:
            target = os.path.splitext(path)[0] + "_backbone.onnx"
            try:
                self.onnx_export(student.img_backbone, target, config=dict(student.student_backbone_cfg), source=path)
            except ValueError as err:
                raise KDRunError("KDExportStudentHook: {} (the checkpoint {} is written; export it again with "
                                 "tools/export_onnx.py)".format(err, path)) from None
            self.written["onnx"] = target
        _log(runner, "KDExportStudentHook: exported the student to {}".format(
            ", ".join(os.path.abspath(self.written[k]) for k in sorted(self.written))))
        if "inference_config" in self.written:
            _log(runner, "KDExportStudentHook: evaluate it with: bash adzoo/orion/orion_dist_eval.sh {} {} GPUS"
                 .format(self.written["inference_config"], path))


def _onnx_exporter(opset: Optional[int]) -> Any:
    """``tools/export_onnx.export_backbone_onnx`` at ``opset``, once its dependencies and the opset are checked."""
    try:
        from tools import export_onnx
    except ImportError as err:
        raise KDRunError("KDExportStudentHook(onnx=True): tools/export_onnx.py cannot be imported ({}); train from "
                         "the ORION-KD checkout or the ORION root it was installed into".format(err)) from None
    opset = export_onnx.DEFAULT_OPSET if opset is None else opset
    try:
        export_onnx.require_onnx_runtime()
        export_onnx.check_opset(opset)
    except export_onnx.OnnxExportError as err:
        raise KDRunError("KDExportStudentHook(onnx=True): {}".format(err)) from None
    return functools.partial(export_onnx.export_backbone_onnx, opset=opset)


def write_inference_config(path: str, base_config: str, backbone_cfg: Dict[str, Any], checkpoint: str) -> str:
    """Write an inference config that inherits ``base_config`` with exactly ``backbone_cfg`` as img_backbone."""
    backbone = dict(_delete_=True)
    backbone.update(backbone_cfg)
    text = ("# Written by KDExportStudentHook: ORION's inference with the KD student's pruned backbone.\n"
            "#   bash adzoo/orion/orion_dist_eval.sh {config} {checkpoint} GPUS\n"
            "_base_ = [{base!r}]\n"
            "model = dict(img_backbone={backbone!r})\n").format(config=path, checkpoint=checkpoint,
                                                                base=base_config, backbone=backbone)
    return atomic_write_text(path, text)


__all__: List[str] = ["run_epoch_length", "epoch_mismatch_message", "KDAlphaScheduleHook", "KDLrLogHook", "KDCheckHook",
                      "KDExportStudentHook", "KDRunError", "student_of", "write_inference_config"]
