"""The head-pruning toolkit, one module per job (the notebook entry is ``tools/head_pruning_utils.py``).

- ``sites``: the backbone and its attention blocks, head-mask hooks, geometry, state save/restore;
- ``batches``: batches to images and losses, progress;
- ``importance``: the four importance methods;
- ``analysis``: what each pruning ratio keeps and costs; ``plots``: heat map and fidelity plots;
- ``cli``: the command line.
The pruning policy and the file formats live beside the backbone (``mmcv/models/utils/pruning_config.py``,
``head_importance.py``), where OrionStudent uses them too. Plugin package: Python 3.8, no mmengine.
"""
