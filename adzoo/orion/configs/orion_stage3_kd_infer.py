# ORION's stage-3 inference with the KD student's pruned EVA-02-L backbone.
#
# A KD run ends with KDExportStudentHook writing, into its work_dir, the student checkpoint and
# an inference config that inherits THIS file with the trained backbone's exact settings (which
# teacher blocks, heads and SwiGLU channels it kept: selected_blocks, selected_heads_per_layer, ...).
# ORION's launcher sets that work_dir itself (the config path with "configs" replaced by "work_dirs";
# a --work-dir of the user's is overridden), so from ORION's root,
# with ORION's own launcher (stored without the executable bit, hence "bash"):
#
#   bash adzoo/orion/orion_dist_eval.sh adzoo/orion/work_dirs/orion_stage3_kd_train/student_pruned_infer.py \
#       adzoo/orion/work_dirs/orion_stage3_kd_train/student_pruned.pth 8
#
# Everything but img_backbone comes from ORION's own inference config. The img_backbone below is
# the template for a uniform 8-of-16 student with every block; a checkpoint loads only into a
# backbone that keeps the same blocks, heads and channels (its meta['img_backbone']), which is what
# the written config sets.

_base_ = ['./orion_stage3_infer.py']

custom_imports = dict(imports=['mmcv.models.backbones.eva_vit_student'], allow_failed_imports=False)


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
        'orion_stage3_kd_infer.py: the ORION-KD plugin is not installed here (cannot import {}); run '
        '"python tools/install_into_orion.py PATH/TO/Orion" from the ORION-KD repository, then start this '
        'config again'.format(_orion_kd_missing_module(custom_imports['imports'])))
del _orion_kd_missing_module

model = dict(
    img_backbone=dict(
        _delete_=True,
        type='EVAViTStudent',
        num_heads=8,  # heads kept per block
        teacher_num_heads=16,  # keeps head_dim 64 and the rope tables of the original backbone
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
