from setuptools import find_packages, setup


# The repository's `conversion/` folder installs as the package `mor_conversion` (a top-level `conversion` would clash
# with other distributions' modules). Its modules import each other relatively, so the folder also runs as it is from
# the repository root (`python -m conversion.uptrain`, the examples, the tests).
CONVERSION_PACKAGES = [
    "mor_conversion" + name[len("conversion"):] for name in find_packages(include=["conversion", "conversion.*"])
]

setup(
    name="mor-transformers",
    version="0.1.0",
    description="Mixture-of-Recursions (MoR) models for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_mor", "modeling_mor.*"]) + CONVERSION_PACKAGES,
    package_dir={"mor_conversion": "conversion"},
    package_data={"mor_conversion": ["MODEL_CARD.md"]},  # the model card template
    entry_points={
        "console_scripts": [
            # conversion/commands.py: each imports its command line (and torch) once Ctrl-C is one error line
            "mor-convert = mor_conversion.commands:convert",
            "mor-uptrain = mor_conversion.commands:uptrain",
            "mor-pretrain = mor_conversion.commands:pretrain",
            "mor-push = mor_conversion.commands:push",
        ],
    },
    install_requires=[
        # The model code checks this range at import (modeling_mor/configuration_mor.py).
        "transformers>=5.24.0,<6",  # tested with 5.24.0 and 5.25.0
        # The floors below are transformers 5.24's own, so that pip never picks an older one we do not run.
        "torch>=2.6",  # tested with 2.13
        "safetensors>=0.8.0",
        "huggingface-hub>=1.31.0,<3",  # pushing uses HfApi.create_commit; tested with 2.4
        "packaging>=20.0",
        # The main job (convert, uptrain with Trainer, the quickstart's progress bars and pictures) needs these, so
        # that `pip install -e .` runs `python examples/quickstart.py` as it is.
        "accelerate>=1.1.0",  # Trainer's own floor; tested with 1.15
        "tqdm>=4.60",
        "matplotlib>=3.5",  # pyplot.subplots, get_cmap, patches.Rectangle; tested with 3.11
    ],
    extras_require={
        # `mor-uptrain --dataset` (a Hub dataset or a local dataset folder); --train-file needs
        # nothing more than install_requires.
        "train": ["datasets>=2.19"],  # tested with 5.2
        "peft": ["peft>=0.17"],  # tested with 0.21
        "eval": ["evaluate>=0.4.3"],
        "lm-eval": ["lm-eval[hf]==0.4.13"],
        # GGUF sources (`convert_llama_to_mor path/to/model.gguf`): transformers dequantizes them with this package.
        "gguf": ["gguf>=0.10.0"],  # transformers 5.24's GGUF_MIN_VERSION
        "dev": [
            "pytest>=8", "peft>=0.17", "evaluate>=0.4.3", "datasets>=2.19", "lm-eval[hf]==0.4.13", "gguf>=0.10.0",
            "parameterized>=0.9",  # transformers' common model tests (tests/test_transformers_common.py)
        ],
    },
)
