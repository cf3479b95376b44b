# Joint head + SwiGLU-width pruning on the miniature ORION world: 8 of 16 heads and 192 of 341 SwiGLU
# hidden channels per block (56%, as ORION-L's 2730 -> 1536), chosen by the teacher's weight magnitudes;
# everything else as orion_tiny_kd_train.py (3 epochs, backbone-only KD).
#
#   python adzoo/orion/train_kd.py adzoo/orion/configs/orion_tiny_kd_joint.py
#   python demo_kd_50_pruning.py --joint          # importance, configuration, KD, and heads-only at equal speed
#
# Other widths: --cfg-options model.img_backbone.mlp_hidden=N model.kd_config.mlp_pruning_ratio=R with
# R = 1 - N / 341 (the check of the kept fraction), or a joint configuration file as model.pruning_config
# (tools/head_pruning_utils.py prune-config --channel-importance ...) with model.kd_config.head_selection=None.

_base_ = ['./orion_tiny_kd_train.py']

model = dict(
    kd_config=dict(mlp_pruning_ratio=1 - 192 / 341),  # fraction of SwiGLU channels REMOVED
    img_backbone=dict(mlp_hidden=192))  # with head_selection='magnitude': channels by weight norms too
work_dir = 'work_dirs/orion_tiny_kd_joint'
