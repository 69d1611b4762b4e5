#!/usr/bin/env python
"""InsLocDetCo: detection-oriented self-supervised pretraining (MoCo v2, InsLoc, DetCo).

Requirements stay loose on purpose: GPU users bring their own torch and a detectron2 built from
source. ``scripts/setup_env.sh`` (``make setup``) installs a CPU-capable stack when there is none.
"""

from setuptools import find_packages, setup

setup(
    name="insloc_detco",
    version="0.1.0",
    description="Detection-oriented self-supervised pretraining on detectron2",
    package_dir={"": "projects/InsLocDetCo"},
    packages=find_packages("projects/InsLocDetCo", include=["insloc_detco", "insloc_detco.*"]),
    python_requires=">=3.8",
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "fvcore>=0.1.5",
        "iopath>=0.1.7",
        "pycocotools>=2.0.2",
        "matplotlib",
        "Pillow",
        # detectron2 is not on PyPI: install it from source, or run scripts/setup_env.sh.
    ],
    extras_require={
        "demo": ["scikit-image"],
        "readout": ["scikit-learn"],
        "cityscapes": ["cityscapesscripts", "shapely"],  # detectron2's Cityscapes loader, evaluator
        "cluster": ["submitit>=1.5"],  # --slurm
        "dev": ["pytest", "ruff==0.17.6"],
    },
)
