"""cltrain: distributed training of cross-layer transcoders (see README.md)."""
from setuptools import setup

setup(
    name="cltrain",
    version="0.1.0",
    description="Distributed training of cross-layer transcoders (CLTs) for circuit tracing",
    python_requires=">=3.10",
    # The repo keeps the design card's top-level layout (train/, kernels/, configs/); installed they
    # live under one namespace, cltrain.*, so they never collide with other packages' "train"/"kernels".
    packages=["cltrain", "cltrain.train", "cltrain.train.data", "cltrain.kernels", "cltrain.configs"],
    package_dir={
        "cltrain": "cltrain",
        "cltrain.train": "train",
        "cltrain.train.data": "train/data",
        "cltrain.kernels": "kernels",
        "cltrain.configs": "configs",
    },
    # kernels/cpu_sparse.c is compiled at first use (kernels/cpu_native.py)
    package_data={"cltrain.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"], "cltrain.kernels": ["*.c"]},
    install_requires=[
        # A range, so the local CPU build 2.13.0 satisfies it and nothing bigger is pulled.
        "torch>=2.4,<2.15",
        "deepspeed>=0.16",
        "accelerate>=1.0",
        "wandb>=0.19.10",  # wandb.init(reinit="create_new"): one W&B run per dictionary of a data pass (train/metrics.py)
        # <1.4: 1.4 exists only as release candidates, and the launchers' own `hydra-core>=1.1.0.dev7`
        # (a pre-release specifier) would otherwise let pip pick one (1.4.0rc3, which also prints a
        # version_base deprecation warning on every command).
        "hydra-core>=1.3,<1.4",
        # Sweep launchers (configs/hydra/launcher/): slurm = submitit, local = joblib. 1.2.0 is the
        # release written for hydra-core 1.3 (the one tested here).
        "hydra-submitit-launcher>=1.2,<1.3",
        "hydra-joblib-launcher>=1.2,<1.3",
        "omegaconf>=2.3",
        "webdataset>=0.2.100",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        # 4.56 is the oldest with the `dtype=` keyword train/lm.py passes. The `graphs` extra narrows
        # this to 4.57.x (circuit-tracer 0.5.0 requires transformers<=4.57.3); the code runs on 5.x too.
        "transformers>=4.56",
        "gguf>=0.10",
        "numpy",
        "tqdm",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        # ruff and import-linter hold the house's rules (make lint); import-linter 2.x has the layers
        # with containers, forbidden and acyclic_siblings contracts .importlinter uses.
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "import-linter>=2.5,<3"],
        # Attribution graphs in clt-eval (train/graphs.py) through circuit-tracer. Pins, each where a
        # newer release breaks the combination:
        "graphs": [
            "circuit-tracer==0.5.0",
            # nnsight 0.7+ removed nnsight.intervention.tracing, which circuit-tracer 0.5.0 imports.
            "nnsight==0.6.3",
            # circuit-tracer 0.5.0 requires transformers<=4.57.3 (and huggingface-hub<1.0 with it).
            "transformers>=4.57,<=4.57.3",
            "huggingface-hub<1.0",
            # transformer-lens 3.3+ requires transformers>=5.4; left open, pip backtracks through
            # every release to find 3.2.x.
            "transformer-lens>=3.0,<3.3",
        ],
    },
    entry_points={
        "console_scripts": [
            "clt-harvest=cltrain.train.harvest:main",
            "clt-train=cltrain.train.trainer:main",
            "clt-eval=cltrain.train.evaluate:main",
            "clt-export=cltrain.train.export:main",
        ]
    },
)
