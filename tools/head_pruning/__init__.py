"""The pruning toolkit (heads, SwiGLU channels, whole blocks), one module per job (entry: ``tools/head_pruning_utils.py``).

- ``sites``: the backbone, its attention blocks and MLPs, mask and pruning hooks, geometry, state save/restore;
- ``batches``: batches to images and losses, progress;
- ``importance``: the four head importance methods; ``channel_importance``: the three channel methods;
- ``block_importance``: whole blocks skipped (KD loss, ShortGPT cosine) and what skipping the least important keeps;
- ``analysis``: what each pruning ratio keeps and costs; ``plots``: heat map and fidelity plots;
- ``budget``: heads, channels and whole blocks chosen for a target speedup; ``timing``: alternating timing and
  measured unit costs;
- ``cli``: the command line (``budget_cli``: ``prune-config --target-speedup``).
The pruning policy and the file formats live beside the backbone (``mmcv/models/utils/pruning_config.py``,
``head_importance.py``), where OrionStudent uses them too. Plugin package: Python 3.8, no mmengine.
"""
