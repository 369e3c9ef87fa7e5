from setuptools import find_packages, setup

setup(
    name="megasparse",
    version="0.1.0",
    description="Pretraining sparse (ReLU-gated, L1-regularised) transformer language models at scale",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megasparse", "megasparse.*", "kernels", "kernels.*"]),
    package_data={"megasparse.data": ["bundled/*.txt", "bundled/*.md"]},
    include_package_data=True,
    install_requires=[
        # torch is pinned by the installer (CI pins the CPU wheel; GPU machines bring their own).
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "numpy<2.4",            # triton 3.6's interpreter fails with newer numpy
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "datasets>=3",
        "tensorboard>=2.15",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "kernels": ["triton==3.6.0"],
        "export": ["transformers>=4.40"],
        "test": ["pytest>=7", "pytest-timeout>=2", "triton==3.6.0", "transformers>=4.40"],   # transformers: export tests
    },
    entry_points={"console_scripts": ["megasparse=megasparse.cli:main"]},
)
