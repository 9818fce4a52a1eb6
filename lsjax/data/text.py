"""Line-aligned parallel text files (plain or gzip) and the Multi30k file layout."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike

# Multi30k split name -> file prefix (files are ``<prefix>.<lang>[.gz]``).
MULTI30K_SPLITS = {"train": "train", "val": "val", "test2016": "test_2016_flickr"}


def iter_lines(path: PathLike) -> Iterator[str]:
    """Lines of a UTF-8 text file without their trailing newline; ``.gz`` files are decompressed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\r\n")


def read_parallel(src_path: PathLike, tgt_path: PathLike) -> list[tuple[str, str]]:
    """``(source, target)`` sentence pairs from two line-aligned files (plain or ``.gz``).

    Raises:
      ValueError: if the files have different numbers of lines.
    """
    src, tgt = list(iter_lines(src_path)), list(iter_lines(tgt_path))
    if len(src) != len(tgt):
        raise ValueError(
            f"parallel files are not line-aligned: {src_path} has {len(src)} lines, "
            f"{tgt_path} has {len(tgt)}"
        )
    return list(zip(src, tgt))


def _existing(base: Path) -> Path:
    for candidate in (base.with_name(base.name + ".gz"), base):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"neither {base}.gz nor {base} exists")


def multi30k_files(
    data_dir: PathLike, split: str, src_lang: str = "en", tgt_lang: str = "de"
) -> tuple[Path, Path]:
    """``(source_file, target_file)`` of a Multi30k split (``train``, ``val`` or ``test2016``).

    Files are looked up as ``<data_dir>/<prefix>.<lang>.gz`` (or uncompressed), e.g.
    ``train.en.gz`` and ``test_2016_flickr.de.gz``.
    """
    if split not in MULTI30K_SPLITS:
        raise ValueError(f"unknown Multi30k split {split!r}; expected one of {sorted(MULTI30K_SPLITS)}")
    base = Path(data_dir) / MULTI30K_SPLITS[split]
    return (
        _existing(base.with_name(f"{base.name}.{src_lang}")),
        _existing(base.with_name(f"{base.name}.{tgt_lang}")),
    )
