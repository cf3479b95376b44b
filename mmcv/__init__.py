"""Light core of ORION-KD's standalone mode.

ORION keeps OpenMMLab-1.x code in a top-level package named ``mmcv``; this
package offers the same import paths for the names the plugin uses, built on
mmengine. It is never copied into an ORION checkout.
"""
from ._install_check import clash_message, foreign_distributions

_FOREIGN_MMCV = foreign_distributions()
if _FOREIGN_MMCV:
    raise ImportError("ORION-KD's light 'mmcv' cannot be used here: " + clash_message(_FOREIGN_MMCV))

from mmengine.config import Config, ConfigDict, DictAction  # noqa: E402

__version__ = "0.1.0-orion-kd-light"
__all__ = ["Config", "ConfigDict", "DictAction"]
