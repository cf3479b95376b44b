# ORION stage 3 with a head-pruned EVA-02-L backbone (16 -> 8 heads) trained by knowledge
# distillation from the frozen original; everything but the student backbone stays frozen.
#
#   ./adzoo/orion/orion_dist_train.sh adzoo/orion/configs/orion_stage3_kd_train.py 8
#
# Inherits ORION's own stage-3 config (data, pipelines, heads, LLM) from an ORION checkout
# (install the plugin with tools/install_into_orion.py); only the keys below change.
# Alpha weights the distillation loss: total = (1 - alpha) * task + alpha * distill, with
# alpha_schedule='step': warmup_alpha for warmup_epochs epochs, then finetune_alpha. For a
# constant alpha use alpha_schedule='constant' with distillation_alpha (not both readings).
# pruning_ratio is the FRACTION OF HEADS REMOVED (0.5: 16 -> 8); it must agree with num_heads.
# Which heads: kd_config.head_selection='magnitude', or a file from `tools/head_pruning_utils.py
# prune-config` as model.pruning_config (with head_selection=None); a pruned student needs exactly one.

_base_ = ['./orion_stage3_train.py']

custom_imports = dict(
    imports=[
        'mmcv.models.backbones.eva_vit_student',
        'mmcv.models.detectors.orion_student',
        'mmcv.models.losses.kd_losses',
    ],
    allow_failed_imports=False)

kd_config = dict(
    teacher_backbone_path='ckpt/orion/orion.pth',  # the full ORION checkpoint (backbone is sliced from it)
    alpha_schedule='step',
    warmup_alpha=0.8,
    finetune_alpha=0.6,
    warmup_epochs=1,
    distillation_temperature=3.0,
    feature_distill_weight=0.5,
    attention_distill_weight=0.3,
    output_distill_weight=0.2,
    freeze_non_backbone=True,
    pruning_ratio=0.5,  # fraction of heads removed
    head_selection='magnitude',  # q/k/v weight norms of the teacher; or None with model.pruning_config=FILE
)

model = dict(
    type='OrionStudent',
    base_detector='Orion',
    teacher_backbone_path=kd_config['teacher_backbone_path'],
    freeze_non_backbone=True,
    kd_config=kd_config,
    distillation_loss=dict(
        type='CombinedKDLoss',
        temperature=kd_config['distillation_temperature'],
        feature_distill_weight=kd_config['feature_distill_weight'],
        attention_distill_weight=kd_config['attention_distill_weight'],
        output_distill_weight=kd_config['output_distill_weight'],
        vl_distill_weight=0.0),
    img_backbone=dict(
        _delete_=True,
        type='EVAViTStudent',
        num_heads=8,  # heads kept per block
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

# AdamW on the student backbone only (the loop optimises parameters that require gradients),
# layer-wise lr decay 0.9 over the 24 blocks keyed on img_backbone.blocks.N.
optimizer = dict(
    _delete_=True,
    constructor='LearningRateDecayOptimizerConstructor',
    type='AdamW',
    lr=8e-5,
    betas=(0.9, 0.999),
    weight_decay=1e-5,
    paramwise_cfg=dict(decay_rate=0.9, decay_type='vit_wise', num_layers=24))
optimizer_config = dict(_delete_=True, grad_clip=dict(max_norm=35, norm_type=2))
fp16 = dict(loss_scale='dynamic')

lr_config = dict(
    _delete_=True,
    policy='CosineAnnealing',
    by_epoch=False,  # cosine per iteration over the 3 epochs
    warmup='linear',
    warmup_iters=500,
    warmup_ratio=1.0 / 3,
    min_lr_ratio=1e-3)
runner = dict(_delete_=True, type='EpochBasedRunner', max_epochs=3)
checkpoint_config = dict(_delete_=True, interval=1, max_keep_ckpts=3)  # every epoch
log_config = dict(
    _delete_=True,
    interval=10,
    hooks=[dict(type='TextLoggerHook'), dict(type='TensorboardLoggerHook')])

find_unused_parameters = False
load_from = None  # the student loads ORION's weights itself (teacher_backbone_path)
resume_from = None
