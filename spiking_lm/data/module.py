"""Next-token windows over a cached token file, and the Lightning DataModule that serves them."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from spiking_lm.data.cache import cached_tokens
from spiking_lm.data.sources import check_source
from spiking_lm.tokenizers import (
    Tokenizer,
    check_bpe_vocab_size,
    check_tokenizer_spec,
    spec_kind,
    tokenizer_from_dict,
)

# Training windows drawn when nothing bounds the epoch. Each window is a function
# of its index only, so the stream never needs to end: ``max_steps`` decides.
TRAIN_SAMPLES = 10**9


class _Windows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``block_size + 1`` tokens from ``[start, stop)`` of a cached token file."""

    def __init__(self, tokens: np.memmap, start: int, stop: int, block_size: int) -> None:
        self._filename = tokens.filename
        self._start, self._stop = start, stop
        self.block_size = block_size
        self._tokens: np.ndarray | None = tokens[start:stop]

    @property
    def max_offset(self) -> int:
        """Last start position at which a whole window fits."""
        return self._stop - self._start - self.block_size - 1

    def _window(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.load(self._filename, mmap_mode="r")[self._start : self._stop]
        window = self._tokens[offset : offset + self.block_size + 1]
        window = torch.from_numpy(window.astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies the whole array; DataLoader workers started
        # by spawn/forkserver re-open the file instead.
        return {**self.__dict__, "_tokens": None}


class _TrainBatches(_Windows):
    """Random training batches, item ``i`` being global batch ``first_batch + i``, a function of that index alone.

    Global batch ``g`` holds samples ``g*B .. g*B + B-1``, and sample ``j``'s window comes from a generator
    seeded with ``(seed, j)``. Under DDP ``train_dataloader`` deals the items out with a ``DistributedSampler``
    without shuffling: rank ``r`` of ``W`` takes items ``r, r + W, ...``, so
    its local batch ``n`` is global batch ``first_batch + n*W + r``. DataLoader workers fetch items by index.
    So what a step sees never depends on the number of workers, on what was drawn before, or on whether
    the run was resumed. A map-style dataset rather than an iterable one, because its length (the epoch's
    batches, which progress bars show) is exact whatever the workers.
    """

    def __init__(
        self,
        tokens: np.memmap,
        start: int,
        stop: int,
        block_size: int,
        batch_size: int,
        seed: int,
        first_batch: int,
        num_batches: int,
    ) -> None:
        super().__init__(tokens, start, stop, block_size)
        self.batch_size, self.seed = batch_size, seed
        self.first_batch, self.num_batches = first_batch, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        return self.batch(self.first_batch + index)

    def sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        return self._window(int(rng.integers(self.max_offset + 1)))

    def batch(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = global_batch * self.batch_size
        xs, ys = zip(*(self.sample(first + j) for j in range(self.batch_size)), strict=True)
        return torch.stack(xs), torch.stack(ys)  # (B, L), (B, L)


class _ValWindows(_Windows):
    """``count`` evenly spaced windows covering the split from end to end."""

    def __init__(self, tokens: np.memmap, start: int, stop: int, block_size: int, count: int) -> None:
        super().__init__(tokens, start, stop, block_size)
        self._offsets = np.linspace(0, self.max_offset, count).round().astype(np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window(int(self._offsets[index]))


class TextDataModule(L.LightningDataModule):
    """Next-token windows over one text source, tokenized once and memory-mapped.

    The first ``1 - val_fraction`` of the tokens is the training split, the
    rest the validation split; windows never cross the boundary. The char
    vocabulary is built from the full text before the split, so validation
    holds no character the model cannot represent; a BPE is trained on the
    training split only (byte-level, it can represent any text).

    Training batches are random but fixed by ``seed`` and their global index,
    shared out between DDP ranks, and ``train_dataloader()`` starts after the
    batches a restored trainer has already consumed. Lightning restarts a
    dataloader from its first batch on resume, so this is what makes a resumed
    run see the same batches as an uninterrupted one.

    The tokenizer is part of ``state_dict()``, so checkpoints carry the
    vocabulary; after ``load_state_dict()`` the text is tokenized with the
    checkpoint's vocabulary.

    Args:
        source: Text source: "python-docs", "tiny_shakespeare", a local text
            file, glob or directory, or "hf:NAME[:CONFIG]" (Hub name, or path
            to a save_to_disk dataset or parquet files).
        tokenizer: "char" (vocabulary from the text; unknown characters are
            an error), "byte" (256 UTF-8 byte values, any file accepted), "bpe"
            (a byte-level BPE of vocab_size tokens trained on the training
            split), a path to a tokenizer.json (or a folder holding one), or a
            Hugging Face Hub name such as "gpt2" (needs the network once).
        vocab_size: Tokens of the BPE that tokenizer="bpe" trains (at least 256).
        block_size: Tokens per training example (context length).
        batch_size: Windows per batch.
        val_fraction: Fraction of the tokens, taken from the end, held out
            for validation; strictly between 0 and 1.
        text_column: Column holding the text, for "hf:" sources.
        num_workers: DataLoader worker processes (0 loads in the main process).
        val_batches: Batches per validation pass; the val_batches * batch_size
            windows are evenly spaced over the split and the same every pass.
        seed: Seed of the training windows.
        cache_dir: Folder for token caches; default $SPIKING_LM_CACHE_DIR,
            else ~/.cache/spiking_lm/tokens.
    """

    def __init__(
        self,
        source: str = "python-docs",
        tokenizer: str = "char",
        vocab_size: int = 4096,
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        text_column: str = "text",
        num_workers: int = 0,
        val_batches: int = 20,
        seed: int = 1337,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
        for name, value, minimum in (
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("val_batches", val_batches, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")
        if tokenizer == "bpe":
            check_bpe_vocab_size(vocab_size)
        check_tokenizer_spec(tokenizer)
        check_source(source)
        self.save_hyperparameters()
        self.tokenizer: Tokenizer | None = None
        self.tokens: np.memmap | None = None
        self.num_train_tokens = 0
        self._checkpoint_tokenizer: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load (or build) the token cache and the tokenizer; later calls are no-ops."""
        if self.tokens is None:
            self._load_tokens()

    def _load_tokens(self) -> None:
        hp = self.hparams
        tokens, tok = cached_tokens(
            hp.source,
            self._checkpoint_tokenizer or hp.tokenizer,
            text_column=hp.text_column,
            vocab_size=hp.vocab_size,
            train_fraction=1.0 - hp.val_fraction,
            cache_dir=hp.cache_dir,
        )
        num_train = int(len(tokens) * (1.0 - hp.val_fraction))
        for split, length in (("training", num_train), ("validation", len(tokens) - num_train)):
            if length < hp.block_size + 1:
                raise ValueError(
                    f"block_size={hp.block_size} needs windows of {hp.block_size + 1} tokens,"
                    f" but the {split} split of {hp.source!r} has only {length} tokens"
                    f" ({len(tokens)} in all, val_fraction={hp.val_fraction})"
                )
        self.tokens, self.tokenizer = tokens, tok
        self.num_train_tokens = num_train

    @property
    def vocab_size(self) -> int:
        """Symbols in the vocabulary (for bpe, those the training text gave, at most ``hparams.vocab_size``);
        reads (or builds) the token cache on first use."""
        self.setup()
        return self.tokenizer.vocab_size

    @property
    def train_tokens(self) -> np.ndarray:
        """Tokens of the training split (memory-mapped)."""
        return self._require_tokens()[: self.num_train_tokens]

    @property
    def val_tokens(self) -> np.ndarray:
        """Tokens of the validation split (memory-mapped)."""
        return self._require_tokens()[self.num_train_tokens :]

    def _require_tokens(self) -> np.memmap:
        if self.tokens is None:
            raise RuntimeError("call setup() first")
        return self.tokens

    def train_dataloader(self) -> DataLoader:
        """Random batches, continuing after those a restored trainer has consumed.

        The epoch lasts the trainer's ``max_steps`` (so progress bars know the
        total); without a trainer or a step limit it is practically endless.
        """
        hp = self.hparams
        trainer = self.trainer
        if trainer is None:
            first, total, world, rank = 0, TRAIN_SAMPLES // hp.batch_size, 1, 0
        else:
            accumulate = trainer.accumulate_grad_batches
            first = trainer.global_step * accumulate
            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            total = steps * accumulate if steps else TRAIN_SAMPLES // hp.batch_size
            world, rank = trainer.world_size, trainer.global_rank
        # Items are global batches, dealt out to the ranks in turn. Not by the sampler Lightning would add: it
        # shuffles, by a permutation of the steps left, so the batches of a step would depend on max_steps and
        # change on resume.
        dataset = _TrainBatches(
            self._require_tokens(),
            0,
            self.num_train_tokens,
            hp.block_size,
            hp.batch_size,
            hp.seed,
            first * world,
            total * world,
        )
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return self._loader(dataset, batch_size=None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """The same ``val_batches * batch_size`` evenly spaced windows every time."""
        hp = self.hparams
        tokens = self._require_tokens()
        count = hp.val_batches * hp.batch_size
        dataset = _ValWindows(tokens, self.num_train_tokens, len(tokens), hp.block_size, count)
        return self._loader(dataset, batch_size=hp.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The validation windows: sources have no third split, so ``test`` re-scores held-out text."""
        return self.val_dataloader()

    def _loader(self, dataset: _Windows, batch_size: int | None, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer, so a checkpoint keeps the vocabulary its model was trained with."""
        if self.tokenizer is not None:
            return {"tokenizer": self.tokenizer.to_dict()}
        if self._checkpoint_tokenizer is not None:
            return {"tokenizer": self._checkpoint_tokenizer}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Adopt a checkpoint's tokenizer, re-tokenizing if ``setup()`` built a different one.

        Lightning restores the datamodule after calling ``setup()``; re-tokenizing
        keeps the token ids consistent with the restored model's embedding.
        """
        saved = state_dict.get("tokenizer")
        if saved is None:
            return
        restored = tokenizer_from_dict(saved)
        if restored.kind != spec_kind(self.hparams.tokenizer):
            raise ValueError(
                f"the checkpoint was trained with the {restored.kind!r} tokenizer but"
                f" data.tokenizer is {self.hparams.tokenizer!r}"
            )
        self._checkpoint_tokenizer = restored.to_dict()
        if self.tokenizer is not None and self.tokenizer != restored:
            self._load_tokens()
