"""Text sources (``sources``), the token cache (``cache``) and the windows and DataModule (``module``)."""

from spiking_lm.data.cache import cached_tokens, default_cache_dir, unigram_entropy
from spiking_lm.data.module import TRAIN_SAMPLES, TextDataModule
from spiking_lm.data.sources import TINY_SHAKESPEARE_URL, data_dir, download_file, load_bytes, load_text

__all__ = [
    "TINY_SHAKESPEARE_URL",
    "TRAIN_SAMPLES",
    "TextDataModule",
    "cached_tokens",
    "data_dir",
    "default_cache_dir",
    "download_file",
    "load_bytes",
    "load_text",
    "unigram_entropy",
]
