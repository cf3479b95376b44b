# The embedded default: KD on the miniature ORION world, same keys as orion_stage3_kd_train.py.
# 8 of 16 heads per block, 3 epochs, backbone-only training; finishes in a few minutes on 2 CPU cores.
#
#   ./adzoo/orion/orion_dist_train.sh adzoo/orion/configs/orion_tiny_kd_train.py 1
#   python adzoo/orion/train_kd.py adzoo/orion/configs/orion_tiny_kd_train.py
#
# The teacher checkpoint is made by `python tools/train_tiny_teacher.py` (the demo does it when
# missing). alpha_schedule='step': alpha = 0.8 in the first epoch, then 0.6;
# total = (1 - alpha) * task + alpha * distill. pruning_ratio is the fraction of heads REMOVED: it sets the
# heads kept per block (img_backbone.num_heads, when given, must agree).
#
# A configuration file instead (heads only, joint, or budgeted with heads, channels and blocks per block):
#   --cfg-options model.pruning_config=FILE model.kd_config.head_selection=None
# The file decides the counts per block; pruning_ratio is checked against a ratio-based file and does not
# apply to a budgeted one (prune-config --target-speedup: its metadata.budget), which the build logs.

_base_ = ['./orion_tiny_train.py']

custom_imports = dict(
    imports=[
        'mmcv.models.backbones.eva_vit_student',
        'mmcv.models.detectors.orion_student',
        'mmcv.models.losses.kd_losses',
        'mmcv.runner.hooks.kd_hooks',
        'mmcv.runner.hooks.resume_check',
    ],
    allow_failed_imports=False)

# Every KD setting lives in model.kd_config, and only there (OrionStudent reads it; a top-level
# kd_config must agree with it). Override with --cfg-options model.kd_config.KEY=VALUE.
model = dict(
    type='OrionStudent',
    base_detector='TinyOrion',
    kd_config=dict(
        teacher_backbone_path='ckpt/orion_tiny/orion_tiny.pth',
        alpha_schedule='step',
        warmup_alpha=0.8,
        finetune_alpha=0.6,
        warmup_epochs=1,  # epochs of this run (KDAlphaScheduleHook: data loader and number of processes)
        distillation_temperature=3.0,
        feature_distill_weight=0.5,
        attention_distill_weight=0.3,
        output_distill_weight=0.2,
        freeze_non_backbone=True,
        frozen_parts_mode='train',
        pruning_ratio=0.5,  # 8 of 16 heads per block
        head_selection='magnitude',  # q/k/v weight norms; or None with model.pruning_config=FILE
    ),
    pruning_config=None,  # a file from tools/head_pruning_utils.py prune-config (then kd_config.head_selection=None)
    distillation_loss=dict(type='CombinedKDLoss'),  # temperature and weights: model.kd_config
    # num_heads=None: the heads kept per block come from kd_config.pruning_ratio, or from model.pruning_config's
    # file (a number here must agree with them)
    img_backbone=dict(type='EVAViTStudent', num_heads=None, teacher_num_heads=16))

# 512 frames = 64 scenes; streaming order as in ORION's stage 3 (warm-up pieces for the first epoch).
data = dict(
    train=dict(num_samples=512),
    shuffler_sampler=dict(_delete_=True, type='InfiniteGroupEachSampleInBatchSampler', seq_split_num=1,
                          warmup_split_num=2, num_iters_to_seq=64))  # iterations: one process's first epoch

# What a KD run needs from the runner, as in ORION (mmcv/runner/hooks/kd_hooks.py).
custom_hooks = [
    dict(type='KDCheckHook', priority='VERY_HIGH'),
    dict(type='KDAlphaScheduleHook'),  # epochs of this run: data loader and number of processes
    # skip a step with a non-finite loss or gradient norm; stop after 3 in a row (before any save)
    dict(type='NonFiniteGuardHook', priority='ABOVE_NORMAL', max_consecutive_skips=3),
    dict(type='KDExportStudentHook', filename='student_pruned.pth'),
    dict(type='KDLrLogHook'),  # lr_top / lr_base in the log
]

optimizer = dict(
    _delete_=True,
    constructor='LearningRateDecayOptimizerConstructor',
    type='AdamW',
    lr=1e-3,
    betas=(0.9, 0.999),
    weight_decay=1e-5,
    paramwise_cfg=dict(decay_rate=0.9, decay_type='vit_wise', num_layers=4))
optimizer_config = dict(_delete_=True, grad_clip=dict(max_norm=35, norm_type=2))
lr_config = dict(_delete_=True, policy='CosineAnnealing', by_epoch=False, warmup='linear', warmup_iters=20,
                 warmup_ratio=1.0 / 3, min_lr_ratio=1e-2)
runner = dict(_delete_=True, type='EpochBasedRunner', max_epochs=3)
checkpoint_config = dict(_delete_=True, interval=1, max_keep_ckpts=3)
# Text log only (the demo plots its loss curves itself); for TensorBoard event files, `pip install tensorboard`
# (or the package's [tensorboard] extra) and add dict(type='TensorboardLoggerHook').
log_config = dict(_delete_=True, interval=16, hooks=[dict(type='TextLoggerHook')])
evaluation = dict(_delete_=True, interval=1, max_samples=256)
work_dir = 'work_dirs/orion_tiny_kd_train'
load_from = None
resume_from = None
