"""simmim-hf: SimMIM masked image modeling for the Hugging Face ecosystem."""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="simmim-hf",
    version="0.1.0",
    description="SimMIM (masked image modeling) pretraining and finetuning with transformers, accelerate and timm",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_simmim"],
    # The local `evaluate` metric (top-k accuracy) is loaded from its folder: ship it in wheels too.
    package_data={"modeling_simmim": ["metrics/*/*.py"]},
    py_modules=["run_mim", "run_image_classification"],
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.9,<6",  # 5.9 introduced the parameter names the adapters use,
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "timm>=1.0",
        "safetensors>=0.4",
        "scipy>=1.10",
        "pillow>=10",
        "pyyaml>=6",
        # The bundled demo data (no network) is built from images these packages ship.
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
    ],
    extras_require={
        "test": ["pytest>=8", "tensorboard>=2.15"],
        "dev": ["pytest>=8", "tensorboard>=2.15", "ruff>=0.6", "psutil>=5"],
    },
    entry_points={
        "console_scripts": [
            "simmim-convert-official=modeling_simmim.convert_official:main",
        ]
    },
)
