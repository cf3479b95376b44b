"""Render the generated blocks of docs/reference.md: the ``kd_config`` keys and every script's options.

The keys and defaults come from ``mmcv/models/utils/kd_config.py`` and the options from the scripts'
own argparse parsers, so the reference cannot drift from the code; the meaning of each ``kd_config``
key is written here, and a key without one is an error.

    python tools/render_reference.py           # rewrite the blocks
    python tools/render_reference.py --check   # exit 1 when docs/reference.md is out of date
"""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.render_results import RenderError, run  # noqa: E402

#: The command-line entry points the docs show, in the order a user meets them.
SCRIPTS = ("demo_kd_50_pruning.py", "tools/head_pruning_utils.py", "adzoo/orion/train_kd.py",
           "tools/install_into_orion.py", "tools/kd_study.py", "tools/train_tiny_teacher.py",
           "tools/benchmark_backbone.py", "tools/benchmark_kd_step.py", "tools/export_onnx.py",
           "tools/benchmark_onnx.py", "tools/gpu_check_summary.py", "tools/render_results.py",
           "tools/render_reference.py", "tools/run_notebook.py", "tools/pareto_sweep.py")

KD_KEY_DOCS = {
    "teacher_backbone_path": "the full ORION checkpoint; read once, memory-mapped, `weights_only=True`; it fills "
                             "the teacher, the sliced student and every frozen part. Required",
    "distillation_alpha": "the constant alpha; only with `alpha_schedule='constant'` (with `'step'` it is refused)",
    "alpha_schedule": "`'step'`: `warmup_alpha` during the warm-up, then `finetune_alpha`; `'constant'`: "
                      "`distillation_alpha` at every iteration. Alpha depends on the iteration only",
    "warmup_alpha": "alpha during the warm-up of the step schedule",
    "finetune_alpha": "alpha after the warm-up of the step schedule",
    "warmup_epochs": "warm-up length in epochs (default 1 when neither this nor `warmup_iters` is given); "
                     "`KDAlphaScheduleHook(iters_per_epoch=...)` converts it to iterations",
    "warmup_iters": "warm-up length in iterations instead of epochs; give one of the two",
    "distillation_temperature": "T of the attention KL (and of CWD when `output_mode='cwd'`)",
    "feature_distill_weight": "weight of the hidden-state MSE inside `backbone_distill_loss`",
    "attention_distill_weight": "weight of the attention KL inside `backbone_distill_loss`",
    "output_distill_weight": "weight of the output feature map term inside `backbone_distill_loss`",
    "vl_distill_weight": "distillation of the visual tokens handed to the LLM; needs a side-effect-free "
                         "`vl_tokens()` (miniature world only; with ORION's heads it is refused)",
    "freeze_non_backbone": "only True is supported: everything outside `img_backbone.*` is frozen",
    "frozen_parts_mode": "`'train'`: frozen neck, heads and LLM stay in ORION's training mode (denoising, "
                         "checkpointing, dropout); `'eval'`: they run in eval mode. The teacher is always in eval mode",
    "pruning_ratio": "fraction of heads REMOVED; when set it must agree with the kept heads "
                     "(`round(H * (1 - ratio))` per block, half up: 0.3 keeps 11 of 16)",
    "mlp_pruning_ratio": "fraction of SwiGLU hidden channels REMOVED; when set it must agree with the kept channels",
    "head_selection": "`'magnitude'`: keep each block's heads (and, with a narrower `mlp_hidden`, channels) with the "
                      "largest weight norms of the teacher; unset: the selection comes from `model.pruning_config` or "
                      "`img_backbone.selected_heads_per_layer` / `selected_channels_per_layer`",
    "teacher_dtype": "unset: the teacher runs in the precision the student backbone ran in; `'fp32'`, `'bf16'` or "
                     "`'fp16'` force one",
    "label_fraction": "fraction of the training frames whose labels the task loss may use (a BLAKE2b hash of "
                      "`scene_token/frame_idx`, else `sample_idx`, decides; the task loss's gradient is averaged "
                      "over the labelled frames of each batch); every frame is distilled",
    "block_map": "`{teacher_block: kept_teacher_block}`: which kept block of a depth-pruned student stands for a "
                 "teacher block in the distillation taps; unset: the block itself when kept, else the last kept "
                 "block before it. Attention of a removed block is distilled only when mapped here, to a kept block "
                 "of the same window/global kind",
}


def kd_config_block() -> str:
    """One row per ``kd_config`` key: its default from the code and its meaning."""
    from mmcv.models.utils.kd_config import KD_CONFIG_KEYS

    undocumented = sorted(set(KD_CONFIG_KEYS) - set(KD_KEY_DOCS))
    stale = sorted(set(KD_KEY_DOCS) - set(KD_CONFIG_KEYS))
    if undocumented or stale:
        raise RenderError(f"tools/render_reference.py: KD_KEY_DOCS lacks {undocumented}, documents removed keys "
                          f"{stale}; keep it equal to kd_config.KD_CONFIG_KEYS")
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default in KD_CONFIG_KEYS.items():
        rows.append(f"| `{key}` | {'unset' if default is None else f'`{default!r}`'} | {KD_KEY_DOCS[key]} |")
    return "\n".join(rows) + "\n"


class _Captured(BaseException):  # not Exception: entry points catch those to print one line
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(script: str) -> argparse.ArgumentParser:
    """Run ``script`` as ``__main__`` until it parses its arguments, and return that parser (nothing else runs)."""
    def stop(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    argv = [str(ROOT / script)]
    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", stop), mock.patch.object(sys, "argv", argv):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except _Captured as found:
            return found.parser
    raise RenderError(f"{script}: parsed no command-line arguments")


def _option_rows(parser: argparse.ArgumentParser) -> List[str]:
    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            name += " " + formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
        default = "" if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings \
            else _default(action)
        text = formatter._expand_help(action) if action.help else ""
        if action.choices and "{" not in name:
            text = (text + " " if text else "") + "(one of: " + ", ".join(map(str, action.choices)) + ")"
        rows.append(f"| `{name}` | {default} | {text.replace('|', '/')} |")
    return rows


def _default(action: argparse.Action) -> str:
    """The default as any machine shows it: paths relative to the checkout, the interpreter and device by role."""
    value = action.default
    if value == sys.executable:
        return "the running Python"
    if "--device" in action.option_strings and value in ("cpu", "cuda"):
        return "`cuda` when available, else `cpu`"
    if isinstance(value, str) and value.startswith(str(ROOT)):
        value = value[len(str(ROOT)):].lstrip("/") or "."
    return f"`{value}`"


def parser_block(title: str, parser: argparse.ArgumentParser) -> List[str]:
    """A heading, the usage line's description and a table of options; subcommands follow as their own blocks."""
    lines = [f"### `{title}`", ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    rows = _option_rows(parser)
    if rows:
        lines += ["| option | default | meaning |", "|---|---|---|"] + rows + [""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += parser_block(f"{title} {name}", sub)
    return lines


def cli_block(scripts: Sequence[str] = SCRIPTS) -> str:
    """Every script's options, read from its own parser."""
    lines: List[str] = []
    for script in scripts:
        lines += parser_block(f"python {script}", capture_parser(script))
    return "\n".join(lines)


def renderers() -> Dict[str, Dict]:
    return {"docs/reference.md": {"kd-config": kd_config_block, "cli": cli_block}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    try:
        changed = run(args.check, renderers())
    except RenderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check and changed:
        print("out of date: docs/reference.md; run: python tools/render_reference.py", file=sys.stderr)
        return 1
    print(("rewrote: " if changed and not args.check else "up to date: ") + "docs/reference.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
