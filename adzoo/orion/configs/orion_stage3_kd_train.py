# ORION stage 3 with a head-pruned EVA-02-L backbone (16 -> 8 heads) trained by knowledge
# distillation from the frozen original; everything but the student backbone stays frozen.
#
#   python tools/install_into_orion.py PATH/TO/Orion --python PATH/TO/ORION/ENV/bin/python   # once, from ORION-KD
#   python demo_kd_50_pruning.py --check-setup --config adzoo/orion/configs/orion_stage3_kd_train.py  # in ORION
#   bash adzoo/orion/orion_dist_train.sh adzoo/orion/configs/orion_stage3_kd_train.py 8
#
# ORION's launcher appends --work-dir adzoo/orion/work_dirs/orion_stage3_kd_train/ (after any of yours):
# checkpoints, student_pruned.pth and its _infer.py land there, its console log in that folder's logs/.
# Data and checkpoints read (ORION's layout): data/bench2drive/ (and maps/), data/infos/b2d_infos_{train,val}.pkl,
# data/infos/b2d_map_infos.pkl, data/chat-B2D/, ckpts/pretrain_qformer/, and the teacher ckpts/Orion.pth.
#
# ORION trains: its launcher, train.py, custom_train_model and IterBasedRunner run unchanged, and
# everything below that is not written here comes from ORION's own stage-3 config: data with
# seq_mode and the streaming InfiniteGroupEachSampleInBatchSampler, the
# LearningRateDecayOptimizerConstructor (AdamW, layer-wise decay), Fp16OptimizerHook, the lr
# schedule, the run length (num_epochs * num_iters_per_epoch iterations), checkpoint_config,
# log_config, load_from / resume_from. This file changes only the model (OrionStudent with an
# EVAViTStudent backbone) and ORION's extension points: custom_imports and custom_hooks.
# An epoch: ORION's config computes num_iters_per_epoch when the file runs, for its num_gpus x
# batch_size (32 x 4); --cfg-options num_gpus=N recomputes nothing. Before the first step,
# KDAlphaScheduleHook compares it with this run's epoch (data loader and world size) and, on any
# other number of GPUs, stops with one line giving the --cfg-options for the epoch, the run length,
# the checkpoint interval, the sampler and the hook (num_iters_per_epoch=E runner.max_iters=6*E
# checkpoint_config.interval=E data.shuffler_sampler.num_iters_to_seq=E evaluation.interval=7*E
# custom_hooks.1.iters_per_epoch=E). For the guide's 3 epochs instead of ORION's 6, use
# runner.max_iters=3*E there.
#
# Alpha weights the distillation loss: total = (1 - alpha) * task + alpha * distill. It follows
# the iteration (KDAlphaScheduleHook): alpha_schedule='step' uses warmup_alpha for warmup_epochs
# epochs of ORION's num_iters_per_epoch iterations (or warmup_iters iterations), then
# finetune_alpha; alpha_schedule='constant' uses distillation_alpha (not both readings).
# pruning_ratio is the FRACTION OF HEADS REMOVED (0.5: 16 -> 8): it sets the heads kept per block
# (img_backbone.num_heads, when given, must agree).
# frozen_parts_mode='train' keeps the frozen heads/LLM in ORION's training behaviour (denoising
# queries, activation checkpointing); 'eval' switches them to eval mode.
# Which heads: kd_config.head_selection='magnitude', or a file from `tools/head_pruning_utils.py
# prune-config` as model.pruning_config (with head_selection=None); a pruned student needs exactly one:
#   --cfg-options model.pruning_config=FILE model.kd_config.head_selection=None
# The file decides the counts per block (heads, channels, kept blocks). pruning_ratio / mlp_pruning_ratio
# are checked against a ratio-based file; a budgeted file (prune-config --target-speedup, its
# metadata.budget: counts differ per block) is not checked against them, which the build logs in one line.
#
# Joint head + SwiGLU-width pruning (>= 1.8x faster backbone instead of <= 1.29x; README_KD.md,
# "Joint head and MLP-width pruning"): write a joint configuration, e.g.
#   python tools/head_pruning_utils.py importance --config THIS_FILE --method magnitude --out work_dirs/heads.json
#   python tools/head_pruning_utils.py importance --config THIS_FILE --unit channels --out work_dirs/channels.json
#   python tools/head_pruning_utils.py prune-config --importance work_dirs/heads.json --pruning-ratio 0.5 \
#       --channel-importance work_dirs/channels.json --mlp-hidden 1536 --out work_dirs/joint_prune.json
# then, in this file:
#   model = dict(..., pruning_config='work_dirs/joint_prune.json',                 # heads and channels per block
#                kd_config=dict(..., head_selection=None, mlp_pruning_ratio=1 - 1536 / 2730))  # optional width check
# img_backbone stays as below: num_heads / mlp_hidden are taken from the file when not given (a given
# value must agree). Without a file, img_backbone=dict(..., mlp_hidden=1536) with head_selection='magnitude'
# keeps the heads (pruning_ratio's count) and channels with the largest weight norms.
# A configuration that also removes whole blocks (its selected_blocks) goes in the same place; depth and
# window_block_indexes below stay the teacher's (24 blocks), and the student keeps each kept block's kind.

_base_ = ['./orion_stage3_train.py']

custom_imports = dict(
    imports=[
        'mmcv.models.backbones.eva_vit_student',
        'mmcv.models.detectors.orion_student',
        'mmcv.models.losses.kd_losses',
        'mmcv.runner.hooks.kd_hooks',
        'mmcv.runner.hooks.resume_check',
    ],
    allow_failed_imports=False)


# ORION's Config runs this file before it reads _base_: without the plugin, stop with one line.
def _orion_kd_missing_module(modules):
    import importlib.util
    for name in modules:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


if _orion_kd_missing_module(custom_imports['imports']) is not None:
    import sys
    sys.unraisablehook = lambda unraisable: None  # mmcv's Config would print its temp file's cleanup at exit
    raise SystemExit(
        'orion_stage3_kd_train.py: the ORION-KD plugin is not installed here (cannot import {}); run '
        '"python tools/install_into_orion.py PATH/TO/Orion" from the ORION-KD repository, then start this '
        'config again'.format(_orion_kd_missing_module(custom_imports['imports'])))
del _orion_kd_missing_module

# Every KD setting lives in model.kd_config, and only there (OrionStudent reads nothing else);
# override with --cfg-options model.kd_config.KEY=VALUE.
model = dict(
    type='OrionStudent',
    base_detector='Orion',
    kd_config=dict(
        teacher_backbone_path='ckpts/Orion.pth',  # ORION's released checkpoint (the backbone is sliced from it)
        alpha_schedule='step',
        warmup_alpha=0.8,
        finetune_alpha=0.6,
        warmup_epochs=1,
        distillation_temperature=3.0,
        feature_distill_weight=0.5,
        attention_distill_weight=0.3,
        output_distill_weight=0.2,
        freeze_non_backbone=True,
        frozen_parts_mode='train',
        pruning_ratio=0.5,  # fraction of heads removed
        head_selection='magnitude',  # q/k/v weight norms of the teacher; or None with model.pruning_config=FILE
    ),
    distillation_loss=dict(type='CombinedKDLoss'),  # temperature and weights: model.kd_config
    img_backbone=dict(
        _delete_=True,
        type='EVAViTStudent',
        num_heads=None,  # heads kept per block: kd_config.pruning_ratio's, or model.pruning_config's file's
        teacher_num_heads=16,
        img_size=640,
        patch_size=16,
        window_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        mlp_ratio=4 * 2 / 3,
        window_block_indexes=(list(range(0, 2)) + list(range(3, 5)) + list(range(6, 8)) + list(range(9, 11))
                              + list(range(12, 14)) + list(range(15, 17)) + list(range(18, 20))
                              + list(range(21, 23))),
        qkv_bias=True,
        drop_path_rate=0.3,
        flash_attn=True,
        with_cp=True,
        frozen=False),
)

# What a KD run needs from ORION's runner (mmcv/runner/hooks/kd_hooks.py).
custom_hooks = [
    dict(type='KDCheckHook', priority='VERY_HIGH'),
    # custom_hooks.1: its iters_per_epoch is checked against the run before the first step
    dict(type='KDAlphaScheduleHook', iters_per_epoch={{_base_.num_iters_per_epoch}}),
    # skip a step with a non-finite loss or gradient norm; stop after 3 in a row (before any save)
    dict(type='NonFiniteGuardHook', priority='ABOVE_NORMAL', max_consecutive_skips=3),
    dict(type='KDExportStudentHook', filename='student_pruned.pth'),
    # lr_top / lr_base in the log: ORION's lr is the first parameter group's (the lowest layer's)
    dict(type='KDLrLogHook'),
    # ORION's train.py ignores a --resume-from path that is not a file: stop instead of starting over
    # (--cfg-options allow_fresh_start=True starts over anyway)
    dict(type='ResumeCheckHook', priority='VERY_HIGH', allow_fresh_start=False),
]
