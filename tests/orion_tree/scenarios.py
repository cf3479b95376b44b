"""The tier's runs in ORION's own code: ``python scenarios.py ORION_COPY OUT_DIR SCENARIO...``.

Each scenario writes OUT_DIR/SCENARIO.json (or SCENARIO.error). They run in a process of their own, never
in pytest's (this repository has its own ``mmcv``): ``boot.py`` makes ORION's files importable,
``tier_models.py`` registers a small base detector and dataset in ORION's registries, and the scenario
calls ORION's code. What a CPU forces, besides boot.py's stubs (all listed in the JSON):

* ``CPU_SUBSTITUTES``: ``Module.cuda()`` is the identity and ``torch.cuda.current_device()`` is 0
  (adzoo/orion/apis/mmdet_train.py moves the model to a GPU); the DDP it builds gets no ``device_ids``
  (torch's DDP refuses them for a CPU module); ``runner.resume``'s default map_location (storages to
  CUDA, mmcv/runner/iter_based_runner.py) maps to the CPU; ORION's ``Fp16OptimizerHook`` creates
  ``torch.cuda.amp.GradScaler()`` (mmcv/runner/hooks/optimizer.py), which turns itself off without
  CUDA, so ``torch.amp.GradScaler('cpu')`` with the same arguments stands in and really scales.
* ``TensorboardLoggerHook`` leaves ``log_config`` when tensorboard is not installed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterator, List

import boot

CPU_SUBSTITUTES = {
    "torch.nn.Module.cuda": "identity (no GPU)",
    "torch.cuda.current_device": "returns 0 (no GPU)",
    "adzoo.orion.apis.mmdet_train.DistributedDataParallel": "torch DDP without device_ids (CPU module)",
    "IterBasedRunner.resume(map_location='default')": "map_location='cpu'",
    "mmcv.runner.hooks.optimizer.GradScaler": "torch.amp.GradScaler('cpu', same arguments), enabled",
}
KD_CONFIG = "adzoo/orion/configs/orion_stage3_kd_train.py"
INFER_CONFIG = "adzoo/orion/configs/orion_stage3_kd_infer.py"
SAMPLES_PER_GPU = 2


def substitute_cpu() -> None:
    """Install ``CPU_SUBSTITUTES`` (after boot)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import adzoo.orion.apis.mmdet_train as mmdet_train
    import mmcv.runner.hooks.optimizer as optimizer_hooks
    from mmcv.runner import IterBasedRunner

    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.current_device = lambda: 0

    class CpuDDP(DistributedDataParallel):
        def __init__(self, module: Any, device_ids: Any = None, **kwargs: Any) -> None:
            super().__init__(module, **kwargs)

    mmdet_train.DistributedDataParallel = CpuDDP
    resume = IterBasedRunner.resume

    def resume_on_cpu(self: Any, checkpoint: str, resume_optimizer: bool = True, map_location: Any = "default"):
        return resume(self, checkpoint, resume_optimizer, "cpu" if map_location == "default" else map_location)

    IterBasedRunner.resume = resume_on_cpu
    optimizer_hooks.GradScaler = lambda **kwargs: torch.amp.GradScaler("cpu", **kwargs)


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the ``with`` block (a scenario's recorder), then the original again."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def teacher_checkpoint(path: str) -> str:
    """An unpruned teacher of ``OrionTierDetector`` (4 heads), saved like ORION's checkpoints."""
    import torch

    from mmcv import ConfigDict
    from mmcv.models import build_model
    from tier_models import TINY_BACKBONE

    if not os.path.isfile(path):
        torch.manual_seed(0)
        model = build_model(ConfigDict(type="OrionTierDetector", img_backbone=dict(
            type="EVAViTStudent", num_heads=4, teacher_num_heads=4, **TINY_BACKBONE)))
        state = {k: v for k, v in model.state_dict().items() if not k.endswith((".head_index", ".channel_index"))}
        torch.save(dict(meta={}, state_dict=state), path)
    return path


def tiny_config(root: str, out: str, work_dir: str, **model_kwargs: Any) -> Any:
    """ORION's Config of the installed KD config with the tier's model and data; ORION's run settings kept."""
    from mmcv import Config
    from tier_models import TINY_BACKBONE

    cfg = Config.fromfile(os.path.join(root, KD_CONFIG))
    teacher = teacher_checkpoint(os.path.join(out, "teacher.pth"))
    kd = dict(cfg.model.kd_config, teacher_backbone_path=teacher)
    # num_heads as the shipped config leaves it: kd_config.pruning_ratio 0.5 keeps 2 of the tier's 4 heads
    backbone = dict(cfg.model.img_backbone, teacher_num_heads=4, **TINY_BACKBONE)
    cfg.model = dict(type=cfg.model.type, base_detector="OrionTierDetector", kd_config=kd,
                     distillation_loss=cfg.model.distillation_loss, img_backbone=backbone, **model_kwargs)
    cfg.data.samples_per_gpu, cfg.data.workers_per_gpu = SAMPLES_PER_GPU, 0
    cfg.data.train = dict(type="OrionTierDataset")
    cfg.data.val = dict(type="OrionTierDataset", test_mode=True, samples_per_gpu=1)
    cfg.log_config.interval = 1
    if importlib.util.find_spec("tensorboard") is None:
        cfg.log_config.hooks = [h for h in cfg.log_config.hooks if h["type"] != "TensorboardLoggerHook"]
    cfg.work_dir, cfg.gpu_ids, cfg.seed = work_dir, [0], 0
    cfg.resume_from = cfg.load_from = None
    return cfg


def kd_config(root: str, out: str, work_dir: str, max_iters: int, **model_kwargs: Any) -> Any:
    """``tiny_config`` for a short run: an epoch of the tier's data, alpha's warm-up 2 iterations."""
    from tier_models import OrionTierDataset

    cfg = tiny_config(root, out, work_dir, **model_kwargs)
    cfg.model.kd_config.pop("warmup_epochs", None)
    cfg.model.kd_config.warmup_iters = 2  # alpha moves within 4 steps
    for hook in cfg.custom_hooks:
        if hook["type"] == "KDAlphaScheduleHook":
            hook["iters_per_epoch"] = len(OrionTierDataset()) // SAMPLES_PER_GPU  # one process
    cfg.runner.max_iters = max_iters
    cfg.checkpoint_config.interval = 2
    return cfg


def train(cfg: Any, distributed: bool = False, validate: bool = False) -> Any:
    """ORION's train.py, from the model build on: build_model, build_dataset, custom_train_model."""
    import torch

    from adzoo.orion.apis.train import custom_train_model
    from mmcv.datasets import build_dataset
    from mmcv.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    custom_train_model(model, [build_dataset(cfg.data.train)], cfg, distributed=distributed, validate=validate,
                       timestamp=time.strftime("%Y%m%d_%H%M%S"), meta=dict(seed=cfg.seed, exp_name="tier"))
    return model


def train_records(work_dir: str, mode: str = "train") -> List[Dict[str, Any]]:
    """The per-iteration records of ORION's TextLoggerHook (``*.log.json``) in ``mode``."""
    records = []
    for name in sorted(os.listdir(work_dir)):
        if name.endswith(".log.json"):
            with open(os.path.join(work_dir, name)) as handle:
                records += [json.loads(line) for line in handle if '"mode": "{}"'.format(mode) in line]
    return records


def backbone_state(model: Any) -> Dict[str, Any]:
    model = getattr(model, "module", model)  # ORION wraps it in DataParallel / DDP
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("img_backbone.")}


def scenario_config(root: str, out: str) -> Dict[str, Any]:
    """ORION's Config loads the KD config; its custom_imports and custom_hooks resolve in ORION's registries."""
    from mmcv import Config
    from mmcv.models.builder import DETECTORS
    from mmcv.runner.hooks import HOOKS
    from mmcv.utils import build_from_cfg

    cfg = Config.fromfile(os.path.join(root, KD_CONFIG))
    hooks = []
    for hook_cfg in cfg.custom_hooks:
        hook_cfg = dict(hook_cfg)
        priority = hook_cfg.pop("priority", "NORMAL")
        hook = build_from_cfg(hook_cfg, HOOKS)
        hooks.append(dict(type=hook_cfg["type"], priority=priority, module=type(hook).__module__,
                          file=sys.modules[type(hook).__module__].__file__, config=hook_cfg))
    student = DETECTORS.get(cfg.model.type)
    return dict(
        config_file=cfg.filename, custom_imports=list(cfg.custom_imports.imports),
        imported_from={name: sys.modules[name].__file__ for name in cfg.custom_imports.imports},
        model_type=cfg.model.type, base_detector=cfg.model.base_detector,
        student_file=sys.modules[student.__module__].__file__ if student else None, hooks=hooks,
        kd_config=dict(cfg.model.kd_config), num_gpus=cfg.num_gpus, batch_size=cfg.batch_size,
        num_iters_per_epoch=cfg.num_iters_per_epoch, num_epochs=cfg.num_epochs, runner=dict(cfg.runner),
        checkpoint_config=dict(cfg.checkpoint_config), optimizer_config=dict(cfg.optimizer_config),
        num_iters_to_seq=cfg.data.shuffler_sampler.num_iters_to_seq)


def scenario_train(root: str, out: str) -> Dict[str, Any]:
    """Four KD iterations through custom_train_model, then ORION's runner.resume from iter_2.pth."""
    import torch

    first, resumed = os.path.join(out, "wd_first"), os.path.join(out, "wd_resumed")
    model = train(kd_config(root, out, first, 4))
    cfg = kd_config(root, out, resumed, 4)
    cfg.resume_from = os.path.join(first, "iter_2.pth")
    seen: Dict[str, Any] = {}
    from mmcv.runner import IterBasedRunner
    resume = IterBasedRunner.resume

    def record_resume(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = resume(self, *args, **kwargs)
        seen.update(iter=self.iter, optimizer=copy.deepcopy(self.optimizer.state_dict()),
                    backbone=backbone_state(self.model))
        return result

    with patched(IterBasedRunner, "resume", record_resume):
        train(cfg)
    saved = torch.load(cfg.resume_from, map_location="cpu", weights_only=True)
    saved_backbone = {k: v for k, v in saved["state_dict"].items() if k.startswith("img_backbone.")}
    differing = sorted(set(seen["backbone"]) ^ set(saved_backbone)) + [
        k for k in saved_backbone if k in seen["backbone"] and not torch.equal(seen["backbone"][k], saved_backbone[k])]
    steps = sorted({float(s["step"]) for s in seen["optimizer"]["state"].values() if "step" in s})
    saved_steps = sorted({float(s["step"]) for s in saved["optimizer"]["state"].values() if "step" in s})
    final = torch.load(os.path.join(resumed, "iter_4.pth"), map_location="cpu", weights_only=True)
    final_steps = sorted({float(s["step"]) for s in final["optimizer"]["state"].values() if "step" in s})
    first_final = torch.load(os.path.join(first, "iter_4.pth"), map_location="cpu", weights_only=True)
    return dict(first=train_records(first), resumed=train_records(resumed), resumed_at=seen["iter"],
                saved_meta_iter=saved["meta"]["iter"], resumed_weights_differing=differing,
                resumed_optimizer_steps=steps, saved_optimizer_steps=saved_steps, final_optimizer_steps=final_steps,
                saved_keys=sorted(first_final["state_dict"]), model_keys=sorted(model.state_dict()),
                non_persistent_buffers=sorted(set(dict(model.named_buffers())) - set(model.state_dict())),
                files=sorted(os.listdir(first)), loss_scaler=first_final["meta"].get("fp16", {}).get("loss_scaler"))


def scenario_fp16(root: str, out: str) -> Dict[str, Any]:
    """ORION's Fp16OptimizerHook with an enabled scaler; the backbone gets inf gradients, the loss stays finite."""
    import torch

    import mmcv.runner.hooks.optimizer as optimizer_hooks

    work_dir = os.path.join(out, "wd_fp16")
    cfg = kd_config(root, out, work_dir, 30, inf_gradients=True)
    scalers: List[Any] = []
    make = optimizer_hooks.GradScaler
    from mmcv.models import build_model
    torch.manual_seed(0)
    initial = backbone_state(build_model(cfg.model))
    error = None
    try:
        with patched(optimizer_hooks, "GradScaler", lambda **kwargs: scalers.append(make(**kwargs)) or scalers[-1]):
            train(cfg)
    except Exception as exc:  # the guard's stop is what this scenario looks for
        error = dict(type=type(exc).__name__, message=str(exc).splitlines()[0] if str(exc) else "")
    records = train_records(work_dir)
    saved = sorted(n for n in os.listdir(work_dir) if n.startswith("iter_"))
    unchanged = True
    for name in saved:
        state = torch.load(os.path.join(work_dir, name), map_location="cpu", weights_only=True)["state_dict"]
        unchanged = unchanged and all(torch.equal(state[k], v) for k, v in initial.items())
    scaler = scalers[0] if scalers else None
    return dict(error=error, iterations=len(records), max_iters=cfg.runner.max_iters, saved=saved,
                weights_unchanged=unchanged, scaler_enabled=bool(scaler and scaler.is_enabled()),
                scaler_device=getattr(scaler, "_device", None), scale=float(scaler.get_scale()) if scaler else None,
                export_written=os.path.exists(os.path.join(work_dir, "student_pruned.pth")),
                guard=[dict(h) for h in cfg.custom_hooks if h["type"] == "NonFiniteGuardHook"])


def scenario_load(root: str, out: str) -> Dict[str, Any]:
    """ORION's load_checkpoint(strict=False) with the exported student: same heads load, other heads refused."""
    import torch

    from mmcv import Config, ConfigDict
    from mmcv.models import build_model
    from mmcv.utils import load_checkpoint
    from tier_models import TINY_BACKBONE

    infer = Config.fromfile(os.path.join(root, INFER_CONFIG))  # its custom_imports register EVAViTStudent
    path = os.path.join(out, "wd_first", "student_pruned.pth")
    exported = torch.load(path, map_location="cpu", weights_only=True)
    state = exported["state_dict"]
    depth = TINY_BACKBONE["depth"]
    kept = [[int(i) for i in state["img_backbone.blocks.{}.attn.head_index".format(b)]] for b in range(depth)]
    other = [sorted(set(range(4)) - set(heads)) for heads in kept]

    def infer_model(selection: List[List[int]]) -> Any:
        backbone = dict(infer.model.img_backbone, num_heads=2, teacher_num_heads=4,
                        selected_heads_per_layer=selection, **TINY_BACKBONE)
        return build_model(ConfigDict(type="OrionTierDetector", img_backbone=backbone)).eval()

    same = infer_model(kept)
    load_checkpoint(same, path, map_location="cpu", strict=False)
    loaded = same.state_dict()
    equal = sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    refused = None
    try:
        load_checkpoint(infer_model(other), path, map_location="cpu", strict=False)
    except Exception as exc:
        refused = dict(type=type(exc).__name__, message=str(exc))
    return dict(kept=kept, other=other, same_selection_loaded_equal=equal, refused=refused,
                meta_pruning=exported["meta"].get("pruning"))


def scenario_ddp(root: str, out: str) -> Dict[str, Any]:
    """custom_train_model(distributed=True, validate=True) in a 1-process gloo group: DDP and the eval hook."""
    import tempfile

    import torch.distributed as dist

    work_dir = os.path.join(out, "wd_ddp")
    init = tempfile.mktemp(prefix="orion_tier_gloo_", dir=out)
    dist.init_process_group("gloo", init_method="file://" + init, rank=0, world_size=1)
    from torch.nn.parallel import DistributedDataParallel
    from mmcv.runner import IterBasedRunner
    calls: List[Dict[str, Any]] = []
    run = IterBasedRunner.run

    def record_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(dict(model=type(self.model).__name__, ddp=isinstance(self.model, DistributedDataParallel),
                          hooks=[type(h).__name__ for h in self.hooks],
                          files=sorted({sys.modules[type(obj).__module__].__file__ for obj in [self] + self.hooks}),
                          eval_by_epoch=[getattr(h, "by_epoch", None) for h in self.hooks
                                         if type(h).__name__.endswith("EvalHook")]))
        return run(self, *args, **kwargs)

    cfg = kd_config(root, out, work_dir, 4)
    cfg.evaluation = dict(cfg.evaluation, interval=3)  # not a logging iteration: ORION's text logger
    cfg.log_config.interval = 2  # then expects the data_time that the evaluation cleared
    try:
        with patched(IterBasedRunner, "run", record_run):
            model = train(cfg, distributed=True, validate=True)
    finally:
        dist.destroy_process_group()
    return dict(runner=calls[0], records=train_records(work_dir), evaluations=train_records(work_dir, "val"),
                distillation_alpha=model.distillation_alpha, files=sorted(os.listdir(work_dir)))


def scenario_epoch(root: str, out: str) -> Dict[str, Any]:
    """ORION's stage-3 epoch (computed for its num_gpus) on a run with another: the KD hook's one line; the
    ``--cfg-options`` it gives, parsed and merged as ORION's train.py does, make the run agree."""
    import argparse

    from mmcv.utils import DictAction

    stop = None
    try:
        train(tiny_config(root, out, os.path.join(out, "wd_epoch_as_configured")))
    except Exception as exc:
        stop = dict(type=type(exc).__name__, message=str(exc))
    given = re.search(r"--cfg-options (.*?) \(", stop["message"]).group(1).split() if stop else []
    parser = argparse.ArgumentParser()
    parser.add_argument("--cfg-options", nargs="+", action=DictAction)  # adzoo/orion/train.py's option
    options = parser.parse_args(["--cfg-options"] + given).cfg_options if given else {}
    work_dir = os.path.join(out, "wd_epoch")
    cfg = tiny_config(root, out, work_dir)
    cfg.merge_from_dict(options)
    train(cfg)
    return dict(stop=stop, options=options, max_iters=cfg.runner.max_iters, records=train_records(work_dir),
                checkpoints=sorted(n for n in os.listdir(work_dir) if n.startswith("iter_")))


#: What the budgeted student keeps of the tier's 2-block, 4-head teacher (MLP width int(32 * 8 / 3) = 85): the
#: windowed block 0 is removed; the global block 1 keeps heads 1 and 3 and every other SwiGLU channel.
BUDGET = dict(blocks=[1], heads=[0, 1, 3], channels=list(range(1, 85, 3)))
#: The trained budgeted student, for scenario_budget_load (same process, run after scenario_budget).
_TRAINED: Dict[str, Any] = {}


def budget_file(path: str) -> str:
    """A budgeted configuration (heads + channels + blocks, ``metadata.budget``) written by the installed
    ``PruningConfig.save``: 3 of 4 heads and 28 of 85 channels, not what kd_config's ratios (0.5) would keep."""
    from mmcv.models.utils.pruning_config import PruningConfig

    kept = [b in BUDGET["blocks"] for b in range(2)]
    PruningConfig(selected_heads_per_layer=[BUDGET["heads"] if k else [] for k in kept], teacher_num_heads=4,
                  pruning_ratio=0.25, selected_channels_per_layer=[BUDGET["channels"] if k else [] for k in kept],
                  teacher_mlp_hidden=85, mlp_pruning_ratio=1 - 28 / 85, selected_blocks=BUDGET["blocks"],
                  method="tier", channel_method="tier", metadata=dict(budget=dict(target_speedup=2.0))).save(path)
    return path


def scenario_budget(root: str, out: str) -> Dict[str, Any]:
    """The stage-3 KD config given a budgeted file the way a heads-only one is given (ORION's Config merges
    ``model.pruning_config=FILE`` and ``model.kd_config.head_selection=None``); four KD iterations in ORION's runner."""
    import torch

    from mmcv.models import build_model

    work_dir = os.path.join(out, "wd_budget")
    cfg = kd_config(root, out, work_dir, 4)
    given_backbone = dict(cfg.model.img_backbone)
    cfg.merge_from_dict({"model.pruning_config": budget_file(os.path.join(out, "budget_prune.json")),
                         "model.kd_config.head_selection": None})
    torch.manual_seed(0)
    initial = build_model(cfg.model).state_dict()
    model = train(cfg)
    teacher = torch.load(cfg.model.kd_config.teacher_backbone_path, map_location="cpu", weights_only=True)
    rows = [h * 8 + i for h in BUDGET["heads"] for i in range(8)]  # head_dim 8
    from_block = {b: torch.equal(initial["img_backbone.blocks.0.attn.q_proj.weight"],
                                 teacher["state_dict"]["img_backbone.blocks.{}.attn.q_proj.weight".format(b)][rows])
                  for b in range(2)}
    exported = torch.load(os.path.join(work_dir, "student_pruned.pth"), map_location="cpu", weights_only=True)
    state = exported["state_dict"]
    backbone = model.img_backbone
    _TRAINED.update(model=model, work_dir=work_dir)
    return dict(records=train_records(work_dir), given_backbone=given_backbone,
                pruning_config=cfg.model.pruning_config, head_selection=cfg.model.kd_config.head_selection,
                source=model.head_selection_source, kept_blocks=list(backbone.kept_blocks),
                selected_heads=backbone.selected_heads, selected_channels=backbone.selected_channels,
                initial_from_teacher_block=from_block, files=sorted(os.listdir(work_dir)),
                meta_pruning=exported["meta"].get("pruning"), meta_backbone=exported["meta"].get("img_backbone"),
                exported_kept_blocks=state["img_backbone.kept_blocks"].tolist(),
                exported_blocks=sorted({k.split(".")[2] for k in state if k.startswith("img_backbone.blocks.")}),
                trained_keys=sorted(k for k, v in state.items() if k.startswith("img_backbone.")
                                    and v.is_floating_point() and not torch.equal(v, initial[k])))


def scenario_budget_load(root: str, out: str) -> Dict[str, Any]:
    """The budgeted student's export through ORION's config for inference: build_model from the written
    ``student_pruned_infer.py``, ORION's load_checkpoint(strict=False), the backbone's forward; a model that keeps
    another block is refused."""
    import torch

    from mmcv import Config, ConfigDict
    from mmcv.models import build_model
    from mmcv.utils import load_checkpoint

    if "work_dir" not in _TRAINED:
        raise RuntimeError("scenario budget_load reads what scenario budget exported: run budget first (it failed "
                           "or did not run)")
    work_dir = _TRAINED["work_dir"]
    path, written = os.path.join(work_dir, "student_pruned.pth"), os.path.join(work_dir, "student_pruned_infer.py")
    infer = Config.fromfile(written)
    backbone = dict(infer.model.img_backbone)
    model = build_model(ConfigDict(type="OrionTierDetector", img_backbone=backbone)).eval()
    load_checkpoint(model, path, map_location="cpu", strict=False)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    trained = _TRAINED["model"].img_backbone.eval()
    with torch.no_grad():
        got, expected = model.img_backbone(images)[0], trained(images)[0]
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    other = {k: list(reversed(v)) if isinstance(v, list) and len(v) == 2 else v for k, v in backbone.items()
             if k != "selected_blocks"}  # the per-block lists moved to block 0
    other["selected_blocks"] = [b for b in range(2) if b not in backbone["selected_blocks"]]
    refused = None
    try:
        load_checkpoint(build_model(ConfigDict(type="OrionTierDetector", img_backbone=other)), path,
                        map_location="cpu", strict=False)
    except Exception as exc:
        refused = dict(type=type(exc).__name__, message=str(exc))
    with open(written) as handle:
        inherits = re.search(r"^_base_ = \[(.*)\]$", handle.read(), re.M)
    return dict(infer_config=written, infer_base=inherits.group(1).strip("'\"") if inherits else None,
                infer_backbone=backbone,
                infer_model_type=infer.model.type, kept_blocks=list(model.img_backbone.kept_blocks),
                state_equal=sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state),
                forward_equal=torch.equal(got, expected), forward_shape=list(got.shape),
                other_blocks=other["selected_blocks"], refused=refused)


SCENARIOS: Dict[str, Callable[[str, str], Dict[str, Any]]] = dict(
    config=scenario_config, epoch=scenario_epoch, train=scenario_train, fp16=scenario_fp16, load=scenario_load,
    ddp=scenario_ddp, budget=scenario_budget, budget_load=scenario_budget_load)


def main(argv: List[str]) -> int:
    """Run the named scenarios in order, in one process; a failed one writes NAME.error and the rest go on."""
    root, out, names = argv[0], argv[1], argv[2:]
    boot.boot(root)
    substitute_cpu()
    import tier_models  # noqa: F401  (registers the tier's detector and dataset in ORION's registries)
    os.chdir(root)  # ORION runs from its root
    failed = 0
    for name in names:
        try:
            result = SCENARIOS[name](root, out)
        except Exception:
            traceback.print_exc()
            with open(os.path.join(out, name + ".error"), "w") as handle:
                handle.write(traceback.format_exc())
            failed += 1
            continue
        result.update(stubs=boot.installed_stubs(), cpu_substitutes=CPU_SUBSTITUTES)
        with open(os.path.join(out, name + ".json"), "w") as handle:
            json.dump(result, handle, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
