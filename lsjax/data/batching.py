"""Length buckets and token-budget batches in a seeded, resumable order.

Every pair goes to the smallest bucket length ``L`` of a ladder with ``len(src) <= L`` and
``len(tgt) + 1 <= L`` (``tgt_in = [bos] + tgt`` and ``tgt_out = tgt + [eos]``). A bucket's batches
all have shape ``[B, L]`` with ``B = max_batch_tokens // L``, so the number of distinct batch shapes
(and of compilations of a jitted step) is at most the ladder's length.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from lsjax.data.text import PathLike, read_parallel
from lsjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("src", "tgt_in", "tgt_out")
OVERLONG_POLICIES = ("error", "drop", "truncate")


def bucket_index(src_len: int, tgt_len: int, bucket_lengths: Sequence[int]) -> int | None:
    """Index of the smallest bucket ``L`` with ``src_len <= L`` and ``tgt_len + 1 <= L`` (None if none)."""
    i = bisect.bisect_left(bucket_lengths, max(src_len, tgt_len + 1))
    return i if i < len(bucket_lengths) else None


def _check_ladder(bucket_lengths: Sequence[int]) -> tuple[int, ...]:
    ladder = tuple(int(length) for length in bucket_lengths)
    if not ladder or ladder[0] < 2 or any(a >= b for a, b in zip(ladder, ladder[1:])):
        raise ValueError(
            f"bucket_lengths must be strictly increasing integers >= 2, got {list(bucket_lengths)}"
        )
    return ladder


def _pad_rows(pairs: list[tuple[Sequence[int], Sequence[int]]], length: int) -> Batch:
    arrays = {key: np.full((len(pairs), length), PAD_ID, np.int32) for key in BATCH_KEYS}
    for row, (src, tgt) in enumerate(pairs):
        arrays["src"][row, : len(src)] = src
        arrays["tgt_in"][row, : len(tgt) + 1] = [BOS_ID, *tgt]
        arrays["tgt_out"][row, : len(tgt) + 1] = [*tgt, EOS_ID]
    return arrays


class TranslationDataset:
    """Token-id pairs padded into per-bucket int32 arrays.

    Attributes:
      bucket_lengths: the ladder's lengths that received at least one pair, ascending.
      arrays: ``{L: {"src", "tgt_in", "tgt_out"}}``, each int32 ``[N_L, L]`` padded with 0.
      stats: ``num_pairs`` (input pairs), ``num_examples`` (kept), ``dropped``, ``truncated``,
        ``bucket_counts`` (``{L: N_L}``), ``token_fill`` (non-pad share of ``src`` + ``tgt_out``).
    """

    def __init__(
        self,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        bucket_lengths: Sequence[int],
        overlong: str = "error",
    ):
        """Buckets ``src_ids[i], tgt_ids[i]`` (without bos/eos).

        Args:
          overlong: what to do with a pair that fits no bucket: ``"error"`` raises, ``"drop"``
            skips it, ``"truncate"`` cuts the source to the longest bucket ``L_max`` and the target to
            ``L_max - 1`` tokens. The counts are in ``stats``.
        """
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} source sequences but {len(tgt_ids)} target sequences")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        ladder = _check_ladder(bucket_lengths)
        longest = ladder[-1]
        rows: list[list] = [[] for _ in ladder]
        dropped = truncated = 0
        for i, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
            b = bucket_index(len(src), len(tgt), ladder)
            if b is None:
                if overlong == "error":
                    raise ValueError(
                        f"pair {i} has {len(src)} source and {len(tgt)} target tokens, over the longest "
                        f"bucket {longest} (needs source <= {longest} and target + eos <= {longest}). "
                        "Add a longer bucket, or pass overlong='drop' or 'truncate'."
                    )
                if overlong == "drop":
                    dropped += 1
                    continue
                src, tgt, b = src[:longest], tgt[: longest - 1], len(ladder) - 1
                truncated += 1
            rows[b].append((src, tgt))
        self.arrays = {length: _pad_rows(r, length) for length, r in zip(ladder, rows) if r}
        self.bucket_lengths = tuple(self.arrays)
        counts = {length: len(r) for length, r in zip(ladder, rows) if r}
        padded = sum(2 * n * length for length, n in counts.items())
        real = sum(np.count_nonzero(a["src"]) + np.count_nonzero(a["tgt_out"]) for a in self.arrays.values())
        self.stats: dict[str, Any] = {
            "num_pairs": len(src_ids),
            "num_examples": sum(counts.values()),
            "dropped": dropped,
            "truncated": truncated,
            "bucket_counts": counts,
            "token_fill": float(real / padded) if padded else 0.0,
        }

    @classmethod
    def from_text_pairs(
        cls,
        pairs: Sequence[tuple[str, str]],
        tokenizer: Tokenizer,
        bucket_lengths: Sequence[int],
        overlong: str = "error",
    ) -> "TranslationDataset":
        """Tokenizes ``(source, target)`` sentences with ``tokenizer`` and buckets them."""
        src = tokenizer.encode_batch([s for s, _ in pairs])
        tgt = tokenizer.encode_batch([t for _, t in pairs])
        return cls(src, tgt, bucket_lengths, overlong)

    @classmethod
    def from_files(
        cls,
        src_path: PathLike,
        tgt_path: PathLike,
        tokenizer: Tokenizer,
        bucket_lengths: Sequence[int],
        overlong: str = "error",
    ) -> "TranslationDataset":
        """Reads two line-aligned text files (plain or ``.gz``), tokenizes and buckets them."""
        return cls.from_text_pairs(read_parallel(src_path, tgt_path), tokenizer, bucket_lengths, overlong)

    def __len__(self) -> int:
        return self.stats["num_examples"]


class BatchIterator(Iterator[Batch]):
    """Token-budget batches of a :class:`TranslationDataset`, shuffled per epoch and resumable.

    Each epoch, the examples of every bucket are permuted and cut into batches of ``B_L`` rows, and
    the batches of all buckets are permuted together; both permutations depend only on
    ``(seed, epoch)``. A bucket's last, partial batch is filled with all-pad rows (whose labels are
    0 and so carry no loss) to keep its shape, or dropped with ``drop_remainder=True``.

    ``state()`` is a small JSON-able dict; ``restore(state)`` makes the next batch the one that
    would have followed ``state()`` without interruption.
    """

    def __init__(
        self,
        dataset: TranslationDataset,
        max_batch_tokens: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        drop_remainder: bool = False,
        batch_size_multiple: int = 1,
    ):
        """
        Args:
          max_batch_tokens: token budget per batch; bucket ``L`` gets ``B_L = max_batch_tokens // L``
            rows (rounded down to a multiple of ``batch_size_multiple``, e.g. the data-parallel size).
          seed: drives the per-epoch shuffles.
          num_epochs: stop after this many epochs; None repeats forever.
        """
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.drop_remainder = drop_remainder
        self.batch_sizes: dict[int, int] = {}
        for length in dataset.bucket_lengths:
            rows = max_batch_tokens // length // batch_size_multiple * batch_size_multiple
            if rows < 1:
                raise ValueError(
                    f"max_batch_tokens={max_batch_tokens} leaves no rows for bucket length {length} with "
                    f"batch_size_multiple={batch_size_multiple}; it must be >= {length * batch_size_multiple}"
                )
            self.batch_sizes[length] = rows
        self._epoch, self._batch_index = 0, 0
        self._plan_epoch, self._plan = -1, []
        if self.batches_per_epoch == 0:
            raise ValueError(
                "no batches: every bucket has fewer examples than its batch size and drop_remainder=True"
            )

    def _batch_counts(self) -> dict[int, int]:
        """Batches per epoch of each bucket."""
        counts = {}
        for length, arrays in self.dataset.arrays.items():
            n, rows = len(arrays["src"]), self.batch_sizes[length]
            counts[length] = n // rows if self.drop_remainder else -(-n // rows)
        return counts

    @property
    def batches_per_epoch(self) -> int:
        return sum(self._batch_counts().values())

    @property
    def num_shapes(self) -> int:
        """Number of distinct batch shapes this iterator yields (buckets with at least one batch)."""
        return len(self.batch_shapes)

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """The distinct ``(B, L)`` batch shapes, by bucket length."""
        return [(self.batch_sizes[L], L) for L, n in self._batch_counts().items() if n]

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if epoch != self._plan_epoch:
            rng = np.random.default_rng((self.seed, epoch))
            plan = []
            for length, n in self._batch_counts().items():
                size, rows = len(self.dataset.arrays[length]["src"]), self.batch_sizes[length]
                order = rng.permutation(size) if self.shuffle else np.arange(size)
                plan += [(length, order[k * rows : (k + 1) * rows]) for k in range(n)]
            if self.shuffle:
                plan = [plan[i] for i in rng.permutation(len(plan))]
            self._plan_epoch, self._plan = epoch, plan
        return self._plan

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        plan = self._epoch_plan(self._epoch)
        length, idx = plan[self._batch_index]
        rows = self.batch_sizes[length]
        batch = {}
        for key, array in self.dataset.arrays[length].items():
            batch[key] = np.full((rows, length), PAD_ID, np.int32)
            batch[key][: len(idx)] = array[idx]
        self._batch_index += 1
        if self._batch_index == len(plan):
            self._epoch, self._batch_index = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """``{"epoch", "batch_index", "seed"}`` of the next batch; JSON-able, for checkpoints."""
        return {"epoch": self._epoch, "batch_index": self._batch_index, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        """Continues from ``state`` (from :meth:`state`), using its seed."""
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if not 0 <= index < self.batches_per_epoch or epoch < 0:
            raise ValueError(
                f"cannot restore {state}: this iterator has {self.batches_per_epoch} batches per epoch "
                "(was the dataset, bucket ladder or max_batch_tokens changed?)"
            )
        self.seed, self._epoch, self._batch_index = int(state["seed"]), epoch, index
        self._plan_epoch = -1
