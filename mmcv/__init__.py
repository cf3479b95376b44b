"""Light core of ORION-KD's standalone mode.

ORION keeps OpenMMLab-1.x code in a top-level package named ``mmcv``; this
package offers the same import paths for the names the plugin uses, built on
mmengine. It is never copied into an ORION checkout.
"""
from mmengine.config import Config, ConfigDict, DictAction

__version__ = "0.1.0-orion-kd-light"
__all__ = ["Config", "ConfigDict", "DictAction"]
