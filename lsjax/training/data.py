"""Builds a run's data from a :class:`DataConfig`: tokenizer, bucketed train iterator, validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

from lsjax import data as lsdata
from lsjax.training.config import DataConfig


@dataclasses.dataclass
class RunData:
    """What the loop needs. ``train`` is an infinite, seeded, resumable iterator of
    ``{"src", "tgt_in", "tgt_out"}`` int32 ``[B, L]`` batches (one shape per bucket)."""

    tokenizer: lsdata.Tokenizer
    train: lsdata.BatchIterator
    valid: lsdata.TranslationDataset
    valid_pairs: list[tuple[str, str]]
    test_pairs: list[tuple[str, str]]
    max_batch_tokens: int
    stats: dict[str, Any]

    def sample_batch(self) -> dict:
        """A one-row all-pad batch of the smallest train shape (for ``model.init``)."""
        length = self.train.batch_shapes[0][1]
        return {k: [[lsdata.PAD_ID] * length] for k in lsdata.BATCH_KEYS}

    def valid_batches(self) -> Iterator[dict]:
        return iter(lsdata.BatchIterator(self.valid, self.max_batch_tokens, shuffle=False, num_epochs=1))


def _split_files(config: DataConfig, data_dir: Path, split: str) -> tuple[Path, Path] | None:
    if config.kind == "multi30k":
        return lsdata.multi30k_files(config.data_dir, {"valid": "val", "test": "test2016"}.get(split, split))
    if config.kind == "synthetic":
        return lsdata.synthetic_files(data_dir, {"valid": "val"}.get(split, split))
    src, tgt = getattr(config, f"{split}_src"), getattr(config, f"{split}_tgt")
    if (src is None) != (tgt is None):
        raise ValueError(f"data.{split}_src and data.{split}_tgt must be given together")
    return None if src is None else (Path(src), Path(tgt))


def _report_overlong(split: str, stats: dict[str, Any], longest: int) -> None:
    if stats["dropped"] or stats["truncated"]:
        print(f"data: {split}: {stats['dropped']} dropped and {stats['truncated']} truncated of "
              f"{stats['num_pairs']} pairs over the longest bucket ({longest} tokens)", flush=True)


def prepare_data(config: DataConfig, run_dir: Path, *, seed: int) -> RunData:
    """Writes the synthetic task if asked, trains (or reuses) the joint tokenizer under
    ``run_dir``, and buckets train and validation text (``config.overlong`` for train pairs over
    the longest bucket, truncation for validation; counts printed and in ``stats``)."""
    data_dir = run_dir / "data"
    if config.kind == "synthetic":
        if not lsdata.synthetic_files(data_dir, "train")[0].exists():
            lsdata.write_synthetic_translation(data_dir, {"train": config.synthetic_pairs, "val": 200, "test": 200},
                                               seed=seed)
    elif config.kind == "multi30k" and not config.data_dir:
        raise ValueError("data.kind=multi30k needs the Multi30k folder: pass --data-dir DIR (or data.data_dir=DIR)")
    train_files = _split_files(config, data_dir, "train")
    valid_files = _split_files(config, data_dir, "valid")
    if train_files is None or valid_files is None:
        raise ValueError("data.kind=files needs data.train_src/train_tgt and data.valid_src/valid_tgt")
    trainer_kwargs = dict(lsdata.SYNTHETIC_TOKENIZER) if config.kind == "synthetic" else {}
    vocab_size = trainer_kwargs.pop("vocab_size", config.vocab_size)
    tokenizer = (lsdata.Tokenizer.load(config.tokenizer) if config.tokenizer else
                 lsdata.load_or_train_tokenizer(list(train_files), run_dir / "spm", vocab_size, **trainer_kwargs))
    train = lsdata.TranslationDataset.from_files(*train_files, tokenizer, config.buckets, overlong=config.overlong)
    valid = lsdata.TranslationDataset.from_files(*valid_files, tokenizer, config.buckets, overlong="truncate")
    for split, dataset in (("train", train), ("valid", valid)):
        _report_overlong(split, dataset.stats, config.buckets[-1])
    iterator = lsdata.BatchIterator(train, config.max_batch_tokens, seed=config.shuffle_seed)
    test_files = _split_files(config, data_dir, "test")
    return RunData(
        tokenizer=tokenizer, train=iterator, valid=valid, valid_pairs=lsdata.read_parallel(*valid_files),
        test_pairs=lsdata.read_parallel(*test_files) if test_files else [],
        max_batch_tokens=config.max_batch_tokens,
        stats={"train": train.stats, "valid": valid.stats, "train_batch_shapes": iterator.batch_shapes},
    )
