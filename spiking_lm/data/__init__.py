"""Text sources (``sources``), the token cache (``cache``) and the windows and DataModule (``module``)."""

from spiking_lm.data.cache import cached_tokens, default_cache_dir, unigram_entropy
from spiking_lm.data.sources import TINY_SHAKESPEARE_URL, data_dir, download_file, load_bytes, load_text, stream_text

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
    "stream_text",
    "unigram_entropy",
]


def __getattr__(name: str):
    # Lightning (a quarter of a gigabyte resident) loads with the DataModule only, so a process that just
    # tokenizes (spiking_lm.data.cache) stays small.
    if name in ("TRAIN_SAMPLES", "TextDataModule"):
        from spiking_lm.data import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
