"""normops: fused normalization layers for PyTorch (Triton on CUDA, ATen on CPU, a NumPy reference)."""
from setuptools import setup

setup(
    name="normops",
    version="0.1.0",
    description="Fused normalization layers for PyTorch: Triton kernels, torch.library ops, drop-in torch.nn modules",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ holds the Triton kernels; it installs as normops.kernels (the import name
    # `kernels` is taken on PyPI).
    packages=["normops", "normops.backends", "normops.backends.numpy_backend", "normops.cli", "normops.kernels",
              "normops.lessons", "normops.models", "normops.ops"],
    package_dir={"normops": "normops", "normops.kernels": "kernels", "": "normops/_launcher"},
    # the console script's launcher: a top-level module, so a Ctrl-C during the imports is caught too
    py_modules=["normops_cli"],
    # torch is not pinned here: pinning would make pip replace a working CUDA torch.
    # triton is optional: only the "triton" backend imports it.
    install_requires=["torch>=2.5", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "transformers", "diffusers", "triton", "pytest-benchmark", "matplotlib", "scikit-learn"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # the practical models and the lessons (normops models, normops demo): the digits dataset, plots
        "models": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["normops=normops_cli:main"]},
)
