from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="bio_ext",
    version="0.1.0",
    description="Backprop-free training (FA, DFA and relatives) for any PyTorch model as a one-line change",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["bio_ext", "bio_ext.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "pyyaml",
        "tensorboard",
        "scikit-learn",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # transformers models (GPT-2's Conv1D, attention, Trainer)
        "hf": ["transformers>=4.40"],
        # biotorch, for the comparison benchmarks and the compatibility tests (no module of bio_ext imports it)
        "compare": ["biotorch"],
        "test": ["pytest>=7", "transformers>=4.40", "accelerate", "biotorch"],
    },
    entry_points={"console_scripts": ["bio-ext-quickstart=bio_ext.quickstart:cli",
                                    "bio-ext-benchmark=bio_ext.benchmark.__main__:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
