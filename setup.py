"""ORION-KD: head pruning + knowledge distillation for ORION's EVA-02-L backbone."""
from setuptools import find_packages, setup

setup(
    name="orion-kd",
    version="0.1.0",
    description="Prune half of the attention heads of ORION's EVA-02-L backbone and recover "
    "accuracy by knowledge distillation from the frozen original.",
    python_requires=">=3.8",
    packages=find_packages(include=["mmcv", "mmcv.*", "adzoo", "adzoo.*", "tools", "tools.*"]),
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
        "test": ["pytest>=7", "vermin>=1.6"],
        "tensorboard": ["tensorboard"],
    },
)
