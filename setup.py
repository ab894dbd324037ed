from setuptools import find_packages, setup


setup(
    name="mor-transformers",
    version="0.1.0",
    description="Mixture-of-Recursions (MoR) models for Hugging Face Transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_mor", "modeling_mor.*", "conversion", "conversion.*"]),
    install_requires=[
        # The model code checks this range at import (modeling_mor/configuration_mor.py).
        "transformers>=5.24.0,<6",
        "torch>=2.6",  # the floor of transformers 5.24 itself; tested with 2.13
        "safetensors>=0.4.3",
        "huggingface-hub>=1.0",
        "packaging",
    ],
    extras_require={
        "train": ["accelerate>=1.1", "tqdm", "matplotlib"],
        "peft": ["peft>=0.17"],
        "eval": ["evaluate>=0.4.3"],
        "lm-eval": ["lm-eval[hf]==0.4.13"],
        "dev": [
            "pytest>=8", "accelerate>=1.1", "tqdm", "matplotlib", "peft>=0.17", "evaluate>=0.4.3", "datasets",
            "lm-eval[hf]==0.4.13",
        ],
    },
)
