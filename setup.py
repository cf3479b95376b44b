"""ORION-KD: head pruning + knowledge distillation for ORION's EVA-02-L backbone.

Installs the packages ``mmcv`` (the light core with ORION's import paths, plus the plugin modules)
and ``adzoo``. The scripts under ``tools/`` are run from the checkout (``python tools/...``) and are
not installed: a top-level package named ``tools`` would collide with other projects' ``tools``.
An environment that already has OpenMMLab's mmcv is refused (``mmcv/_install_check.py``): the two
``mmcv`` packages would shadow each other.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def refuse_next_to_a_real_mmcv() -> None:
    """Run the clash check with the target interpreter, isolated (-I) from pip's build environment."""
    check = os.path.join(HERE, "mmcv", "_install_check.py")
    proc = subprocess.run([sys.executable, "-I", check], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr or proc.stdout)
        raise SystemExit(1)


refuse_next_to_a_real_mmcv()

from setuptools import find_packages, setup  # noqa: E402

setup(
    name="orion-kd",
    version="0.1.0",
    description="Prune half of the attention heads of ORION's EVA-02-L backbone and recover "
    "accuracy by knowledge distillation from the frozen original.",
    python_requires=">=3.8",
    packages=find_packages(include=["mmcv", "mmcv.*", "adzoo", "adzoo.*"]),
    py_modules=["demo_kd_50_pruning"],
    install_requires=[
        "torch>=2.1",
        "mmengine>=0.10",
        "transformers>=4.40",
        "numpy",
        "safetensors",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "vermin>=1.6", "onnx>=1.14", "onnxruntime>=1.16", "nbclient>=0.7",
                 "nbformat>=5", "ipykernel>=6"],
        "onnx": ["onnx>=1.14", "onnxruntime>=1.16"],
        "tensorboard": ["tensorboard"],
    },
)
