# Miniature ORION (TinyOrion) trained from scratch on SyntheticChatB2D: the tiny teacher.
# ORION config layout (model / data / optimizer / lr_config / runner / checkpoint_config /
# log_config / work_dir). Train with:  python tools/train_tiny_teacher.py --config THIS_FILE
# Shapes: 2 cameras of 80x80 px, patch 8 -> a 10x10 token grid; window blocks use 4x4
# windows on the grid zero-padded to 12x12 (3x3 windows, like ORION's 40 -> 48 with 16x16).
# Data: scenes of 8 frames 0.5 s apart; the detection head keeps a temporal memory per batch
# slot, so training streams scenes (data.shuffler_sampler, ORION's stage-3 keys) and
# evaluation walks them in order.

img_size = 80
patch_size = 8
num_cams = 2
embed_dim = 128
grid = img_size // patch_size
plan_horizon = 6
lm_hidden = 64

model = dict(
    type='TinyOrion',
    use_grid_mask=True,
    grid_mask=dict(prob=0.5, ratio=0.7, d_min=8, d_max=24),
    img_backbone=dict(
        type='EVAViT',
        img_size=img_size,
        patch_size=patch_size,
        window_size=4,
        in_chans=3,
        embed_dim=embed_dim,
        depth=4,
        num_heads=16,
        mlp_ratio=4 * 2 / 3,
        qkv_bias=True,
        drop_path_rate=0.05,
        window_block_indexes=[0, 2],
        pretrain_img_size=img_size,
        pretrain_use_cls_token=False,
        flash_attn=True,  # the fused path (scaled_dot_product_attention, CPU included); False: explicit softmax
        with_cp=False,
        frozen=False),
    pts_bbox_head=dict(
        type='TinyDetHead', in_channels=embed_dim, feat_channels=96, num_classes=3, num_light_states=3,
        stride=patch_size, score_thr=0.4, nms_iou=0.5, memory=True, memory_max_gap=2.0),
    map_head=dict(type='TinyMapHead', in_channels=embed_dim, feat_channels=64, stride=patch_size, mask_stride=4),
    vl_proj=dict(type='TinyVLProjector', in_channels=embed_dim, det_channels=96, out_channels=lm_hidden,
                 num_cams=num_cams, grid_hw=(grid, grid), pool=5, count_tokens=True, num_classes=3),
    lm_head=dict(type='TinyCausalLM', hidden_size=lm_hidden, num_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128, plan_horizon=plan_horizon, frozen=False),
    train_cfg=None,
    test_cfg=dict(max_answer_len=3))

dataset_type = 'SyntheticChatB2D'
scene_len = 8
max_iters = 1600  # stage 1; its validation metrics plateau by ~1200 (docs/tiny_teacher_curve.png)

# The teacher trains in two stages (tools/train_tiny_teacher.py):
# 1. perception: the whole model end to end for runner.max_iters, grid mask on, with a VL projector
#    without count tokens (model_changes);
# 2. language: a fresh VL projector (with count tokens) and LM learn to read the frozen stage-1
#    backbone, detection and lane heads (eval mode, no grid mask) for language_stage.max_iters,
#    in batches of 16 streamed scenes: in batches of 8 (consecutive frames are alike) the counts
#    were learned too slowly. Trained end to end, the tiny LM learned to count or to answer the
#    rest, never both (README_KD.md, "Counting").
perception_stage = dict(model_changes=dict(vl_proj=dict(count_tokens=False)))
language_stage = dict(max_iters=1600, samples_per_gpu=16, trained_modules=['vl_proj', 'lm_head'])
data = dict(
    samples_per_gpu=8,
    workers_per_gpu=0,
    train=dict(type=dataset_type, split='train', num_samples=2048, seed=0, img_size=(img_size, img_size),
               num_cams=num_cams, lane_mask_stride=4, plan_horizon=plan_horizon, scene_len=scene_len,
               seq_mode=True, seq_split_num=1),
    val=dict(type=dataset_type, split='val', num_samples=256, seed=0, img_size=(img_size, img_size),
             num_cams=num_cams, lane_mask_stride=4, plan_horizon=plan_horizon, scene_len=scene_len),
    test=dict(type=dataset_type, split='test', num_samples=256, seed=0, img_size=(img_size, img_size),
              num_cams=num_cams, lane_mask_stride=4, plan_horizon=plan_horizon, scene_len=scene_len),
    # ORION's streaming order: every batch slot walks one scene; scenes are cut into short pieces
    # (2 cut points) for the first quarter of training, then streamed whole.
    shuffler_sampler=dict(type='InfiniteGroupEachSampleInBatchSampler', seq_split_num=1, warmup_split_num=2,
                          num_iters_to_seq=max_iters // 4))

optimizer = dict(type='AdamW', lr=2e-3, weight_decay=1e-4)
optimizer_config = dict(grad_clip=dict(max_norm=5.0, norm_type=2))
lr_config = dict(policy='CosineAnnealing', warmup='linear', warmup_iters=60, warmup_ratio=1.0 / 10,
                 min_lr_ratio=1e-2)
runner = dict(type='IterBasedRunner', max_iters=max_iters)
checkpoint_config = dict(interval=max_iters)
log_config = dict(interval=20, hooks=[dict(type='TextLoggerHook')])
evaluation = dict(interval=max_iters, max_samples=256)
# One thread: on 2 cores shared with other jobs, 2 threads per process run ~4x slower (0.6 vs 3 s/iter).
num_threads = 1
seed = 0
work_dir = 'work_dirs/orion_tiny'
# Retrained teachers go here; the shipped one (ckpt/orion_tiny/orion_tiny_teacher.safetensors) is replaced
# only by `python tools/train_tiny_teacher.py --ship`.
out_checkpoint = 'work_dirs/orion_tiny/orion_tiny_retrained.pth'
