"""lsjax.data: tokenizer, parallel text, length buckets, token-budget batches, resume, synthetic task."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from lsjax import data

LADDER = (8, 16, 32)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic")
    data.write_synthetic_translation(path, {"train": 2000, "val": 100}, seed=3)
    return path


@pytest.fixture(scope="module")
def tokenizer(synthetic_dir) -> data.Tokenizer:
    return data.train_tokenizer(
        data.synthetic_files(synthetic_dir, "train"), synthetic_dir / "spm", **data.SYNTHETIC_TOKENIZER
    )


def random_pairs(rng: np.random.Generator, n: int, max_len: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random token-id sequences (ids >= 4, so never a special id) of lengths 0..max_len."""
    src = [list(rng.integers(4, 100, rng.integers(0, max_len + 1))) for _ in range(n)]
    tgt = [list(rng.integers(4, 100, rng.integers(0, max_len + 1))) for _ in range(n)]
    return src, tgt


def real_rows(batch: data.Batch) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(src, tgt) of every non-pad row, with padding, bos and eos stripped."""
    rows = []
    for src, tgt_out in zip(batch["src"], batch["tgt_out"]):
        if tgt_out[0] != data.PAD_ID:  # real rows have at least eos
            tgt = tuple(tgt_out[: list(tgt_out).index(data.EOS_ID)])
            rows.append((tuple(src[src != data.PAD_ID]), tgt))
    return rows


def take(iterator, n: int) -> list[data.Batch]:
    return list(itertools.islice(iterator, n))


def assert_same_batches(a: list[data.Batch], b: list[data.Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in data.BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


# Tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_special_ids_and_round_trip(tokenizer, synthetic_dir):
    sp = tokenizer.processor
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.vocab_size == data.SYNTHETIC_TOKENIZER["vocab_size"]
    for src, tgt in data.read_parallel(*data.synthetic_files(synthetic_dir, "val")):
        for sentence in (src, tgt):
            ids = tokenizer.encode(sentence)
            assert min(ids) > data.EOS_ID  # no specials inside a sentence
            assert len(ids) == len(sentence.split())  # one piece per synthetic word
            assert tokenizer.decode(ids) == sentence
            # decode drops bos/pad and stops at the first eos.
            assert tokenizer.decode([data.BOS_ID, *ids, data.EOS_ID, *ids, data.PAD_ID]) == sentence
    reloaded = data.Tokenizer.load(synthetic_dir / "spm.model")
    assert reloaded.encode_batch([src, tgt]) == [tokenizer.encode(src), tokenizer.encode(tgt)]


def test_train_tokenizer_reads_gzip_and_iterables(tokenizer, synthetic_dir, tmp_path):
    gz_files = []
    for path in data.synthetic_files(synthetic_dir, "train"):
        gz_files.append(tmp_path / (path.name + ".gz"))
        gz_files[-1].write_bytes(gzip.compress(path.read_bytes()))
    from_gz = data.train_tokenizer(gz_files, tmp_path / "gz", **data.SYNTHETIC_TOKENIZER)
    src_file, tgt_file = data.synthetic_files(synthetic_dir, "train")
    mixed = data.train_tokenizer(
        [src_file, data.iter_lines(tgt_file)], tmp_path / "mixed", **data.SYNTHETIC_TOKENIZER
    )
    val = [s for pair in data.read_parallel(*data.synthetic_files(synthetic_dir, "val")) for s in pair]
    assert from_gz.encode_batch(val) == tokenizer.encode_batch(val) == mixed.encode_batch(val)


def test_train_tokenizer_vocab_too_large(tmp_path):
    sentences = ["a small corpus", "with few pieces"] * 20
    with pytest.raises(ValueError, match="hard_vocab_limit=False"):
        data.train_tokenizer([sentences], tmp_path / "big", 1000)
    soft = data.train_tokenizer([sentences], tmp_path / "soft", 1000, hard_vocab_limit=False)
    assert 4 < soft.vocab_size < 1000
    with pytest.raises(ValueError, match="larger vocab_size"):
        data.train_tokenizer([sentences], tmp_path / "tiny", 8)
    with pytest.raises(ValueError, match="no sentences"):
        data.train_tokenizer([[]], tmp_path / "empty", 100)


def test_load_or_train_tokenizer_reuses_matching_model(tmp_path):
    sentences = [f"word{i % 7} thing{i % 5} item{i % 3}" for i in range(200)]
    first = data.load_or_train_tokenizer([sentences], tmp_path / "spm", 40, model_type="bpe")
    mtime = (tmp_path / "spm.model").stat().st_mtime_ns
    again = data.load_or_train_tokenizer([sentences], tmp_path / "spm", 40, model_type="bpe")
    assert (tmp_path / "spm.model").stat().st_mtime_ns == mtime and again.vocab_size == first.vocab_size == 40
    retrained = data.load_or_train_tokenizer([sentences], tmp_path / "spm", 30, model_type="bpe")
    assert retrained.vocab_size == 30 and (tmp_path / "spm.model").stat().st_mtime_ns != mtime


# Parallel text -------------------------------------------------------------------------------


def test_read_parallel_plain_and_gzip(rng, tmp_path):
    lines = ["".join(rng.choice(list("abcdé xyz"), rng.integers(0, 30))) for _ in range(50)]
    plain, gz, short = tmp_path / "a.txt", tmp_path / "b.txt.gz", tmp_path / "c.txt"
    plain.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    gz.write_bytes(gzip.compress("".join(f"{line[::-1]}\n" for line in lines).encode()))
    short.write_text("".join(f"{line}\n" for line in lines[:-1]), encoding="utf-8")
    assert data.read_parallel(plain, gz) == [(line, line[::-1]) for line in lines]
    with pytest.raises(ValueError, match=r"a\.txt has 50 lines.*c\.txt has 49"):
        data.read_parallel(plain, short)


def test_multi30k_files_layout(tmp_path):
    for prefix, suffix in (("train", ".gz"), ("val", ""), ("test_2016_flickr", ".gz")):
        for lang in ("en", "de"):
            (tmp_path / f"{prefix}.{lang}{suffix}").touch()
    assert data.multi30k_files(tmp_path, "train") == (tmp_path / "train.en.gz", tmp_path / "train.de.gz")
    assert data.multi30k_files(tmp_path, "val") == (tmp_path / "val.en", tmp_path / "val.de")
    assert data.multi30k_files(tmp_path, "test2016")[1] == tmp_path / "test_2016_flickr.de.gz"
    with pytest.raises(ValueError, match="unknown Multi30k split"):
        data.multi30k_files(tmp_path, "test2017")
    with pytest.raises(FileNotFoundError, match="train.fr"):
        data.multi30k_files(tmp_path, "train", tgt_lang="fr")


# Buckets -------------------------------------------------------------------------------------


def test_bucket_assignment_and_padding(rng):
    src, tgt = random_pairs(rng, 300, max_len=31)  # every pair fits bucket 32 (target + eos <= 32)
    ds = data.TranslationDataset(src, tgt, LADDER)
    expected = collections.defaultdict(list)
    for s, t in zip(src, tgt):
        need = max(len(s), len(t) + 1)
        expected[min(L for L in LADDER if L >= need)].append((tuple(s), tuple(t)))
    assert ds.stats["bucket_counts"] == {L: len(rows) for L, rows in sorted(expected.items())}
    assert ds.stats["dropped"] == ds.stats["truncated"] == 0
    for L, arrays in ds.arrays.items():
        assert all(a.dtype == np.int32 and a.shape == (len(expected[L]), L) for a in arrays.values())
        assert sorted(real_rows(arrays)) == sorted(expected[L])
        # tgt_in is tgt_out shifted right by one behind bos.
        np.testing.assert_array_equal(arrays["tgt_in"][:, 0], data.BOS_ID)
        shifted = np.where(arrays["tgt_out"][:, :-1] == data.EOS_ID, data.PAD_ID, arrays["tgt_out"][:, :-1])
        np.testing.assert_array_equal(arrays["tgt_in"][:, 1:], shifted)


def test_overlong_pairs(rng):
    src, tgt = random_pairs(rng, 200, max_len=40)
    overlong = sum(max(len(s), len(t) + 1) > LADDER[-1] for s, t in zip(src, tgt))
    assert overlong > 0
    with pytest.raises(ValueError, match="longest bucket 32"):
        data.TranslationDataset(src, tgt, LADDER)
    dropped = data.TranslationDataset(src, tgt, LADDER, overlong="drop")
    assert dropped.stats["dropped"] == overlong and len(dropped) == 200 - overlong
    cut = data.TranslationDataset(src, tgt, LADDER, overlong="truncate")
    assert cut.stats["truncated"] == overlong and len(cut) == 200
    assert cut.stats["bucket_counts"][32] == dropped.stats["bucket_counts"].get(32, 0) + overlong
    long_rows = set(real_rows(cut.arrays[32]))
    for s, t in zip(src, tgt):
        if max(len(s), len(t) + 1) > 32:
            assert (tuple(s[:32]), tuple(t[:31])) in long_rows


# Batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_batches_bounded_shapes_and_token_budget(rng, drop_remainder):
    src, tgt = random_pairs(rng, 500, max_len=31)
    ds = data.TranslationDataset(src, tgt, LADDER)
    max_tokens = 256
    it = data.BatchIterator(ds, max_tokens, seed=0, num_epochs=1, drop_remainder=drop_remainder)
    batches = list(it)
    assert len(batches) == it.batches_per_epoch
    shapes = {b["src"].shape for b in batches}
    assert shapes == set(it.batch_shapes) and len(shapes) == it.num_shapes <= len(LADDER)
    # Bucket L has B = max_tokens // L rows; with drop_remainder a bucket of fewer pairs yields nothing.
    counts = ds.stats["bucket_counts"]
    assert shapes == {(max_tokens // L, L) for L, n in counts.items() if not drop_remainder or n >= max_tokens // L}
    for b in batches:
        assert sorted(b) == sorted(data.BATCH_KEYS)
        assert all(v.dtype == np.int32 and v.shape == b["src"].shape for v in b.values())
    rows = [row for b in batches for row in real_rows(b)]
    pairs = sorted((tuple(s), tuple(t)) for s, t in zip(src, tgt))
    if drop_remainder:  # every row is real; n_L mod B_L pairs of each bucket are left out
        assert all(len(real_rows(b)) == b["src"].shape[0] for b in batches)
        assert collections.Counter(rows) <= collections.Counter(pairs)
        assert len(pairs) - len(rows) == sum(n % (max_tokens // L) for L, n in counts.items())
    else:  # every pair exactly once; padding rows only in the last batch of each bucket
        assert sorted(rows) == pairs
        assert sum(len(real_rows(b)) < b["src"].shape[0] for b in batches) <= it.num_shapes


def test_batch_size_multiple_and_too_small_budget(rng):
    ds = data.TranslationDataset(*random_pairs(rng, 100, max_len=31), LADDER)
    it = data.BatchIterator(ds, 1000, batch_size_multiple=8)
    assert it.batch_sizes == {8: 120, 16: 56, 32: 24}
    with pytest.raises(ValueError, match="must be >= 256"):
        data.BatchIterator(ds, 200, batch_size_multiple=8)


def test_shuffle_is_deterministic_per_seed_and_epoch(rng):
    ds = data.TranslationDataset(*random_pairs(rng, 400, max_len=31), LADDER)
    make = lambda seed, **kw: data.BatchIterator(ds, 128, seed=seed, **kw)  # noqa: E731
    n = make(0).batches_per_epoch
    first = take(make(7), 2 * n)
    assert_same_batches(first, take(make(7), 2 * n))
    as_rows = lambda batches: [real_rows(b) for b in batches]  # noqa: E731
    assert as_rows(first) != as_rows(take(make(8), 2 * n))
    assert as_rows(first[:n]) != as_rows(first[n:])  # reshuffled each epoch
    assert sorted(sum(as_rows(first[:n]), [])) == sorted(sum(as_rows(first[n:]), []))
    ordered = take(make(7, shuffle=False), 2 * n)
    assert_same_batches(ordered[:n], ordered[n:])


def test_resume_continues_exactly(rng):
    ds = data.TranslationDataset(*random_pairs(rng, 300, max_len=31), LADDER)
    make = lambda: data.BatchIterator(ds, 128, seed=11)  # noqa: E731
    n = make().batches_per_epoch
    reference = take(make(), 3 * n)
    for stop in (0, int(rng.integers(1, n)), n, n + int(rng.integers(1, n))):
        it = make()
        take(it, stop)
        state = json.loads(json.dumps(it.state()))
        assert state == {"epoch": stop // n, "batch_index": stop % n, "seed": 11}
        resumed = make()
        resumed.restore(state)
        assert_same_batches(take(resumed, 3 * n - stop), reference[stop:])
    with pytest.raises(ValueError, match="batches per epoch"):
        make().restore({"epoch": 0, "batch_index": n, "seed": 11})


def test_finite_epochs_stop():
    ds = data.TranslationDataset([[5]] * 10, [[6, 7]] * 10, LADDER)
    it = data.BatchIterator(ds, 32, num_epochs=2)
    assert it.batch_sizes == {8: 4} and it.batches_per_epoch == 3
    assert len(list(it)) == 6 and it.state()["epoch"] == 2


# Synthetic task ------------------------------------------------------------------------------


def test_synthetic_translation_is_deterministic_and_consistent(tmp_path):
    pairs = data.synthetic_translation(500, seed=1)
    assert pairs == data.synthetic_translation(500, seed=1)
    assert pairs != data.synthetic_translation(500, seed=2)
    dictionary = collections.defaultdict(set)
    for src, tgt in pairs:
        s, t = src.split(), tgt.split()
        assert 3 <= len(s) <= 10 and len(s) == len(t)
        for a, b in zip(s, reversed(t)):
            dictionary[a].add(b)
    assert len(dictionary) == 24 and all(len(v) == 1 for v in dictionary.values())
    assert len(set.union(*dictionary.values())) == 24  # one-to-one
    other = data.synthetic_translation(200, seed=2)  # same dictionary in another split
    for src, tgt in other:
        assert [dictionary[a] for a in src.split()] == [{b} for b in reversed(tgt.split())]
    files = data.write_synthetic_translation(tmp_path, {"train": 50, "test": 20}, seed=1)
    assert data.read_parallel(*files["train"]) == data.synthetic_translation(50, seed=1)
    assert len(data.read_parallel(*files["test"])) == 20


def test_synthetic_pipeline_end_to_end(tokenizer, synthetic_dir):
    ds = data.TranslationDataset.from_files(*data.synthetic_files(synthetic_dir, "train"), tokenizer, LADDER)
    assert ds.bucket_lengths == (8, 16) and len(ds) == 2000  # <= 10 words + eos
    batch = next(data.BatchIterator(ds, 512, seed=0))
    src, tgt = tokenizer.decode(batch["src"][0]), tokenizer.decode(batch["tgt_out"][0])
    assert tokenizer.decode(batch["tgt_in"][0]) == tgt
    assert (src, tgt) in set(data.read_parallel(*data.synthetic_files(synthetic_dir, "train")))


# Multi30k ------------------------------------------------------------------------------------

MULTI30K = Path(os.environ.get("LSJAX_MULTI30K", "/work/shared/data/multi30k"))


@pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"no Multi30k at {MULTI30K} (set LSJAX_MULTI30K)")
def test_multi30k_slice(tmp_path):
    pairs = data.read_parallel(*data.multi30k_files(MULTI30K, "val"))
    assert len(pairs) == 1014 and all(src and tgt for src, tgt in pairs)
    train = list(itertools.islice(data.read_parallel(*data.multi30k_files(MULTI30K, "train")), 2000))
    tok = data.train_tokenizer([[s for s, _ in train], [t for _, t in train]], tmp_path / "m30k", 1000)
    for src, tgt in train[:50]:
        assert tok.decode(tok.encode(src)) == " ".join(src.split())
        assert tok.decode(tok.encode(tgt)) == " ".join(tgt.split())
    ds = data.TranslationDataset.from_text_pairs(pairs, tok, (16, 32, 64), overlong="drop")
    overlong = sum(max(len(tok.encode(s)), len(tok.encode(t)) + 1) > 64 for s, t in pairs)
    assert ds.stats["num_pairs"] == 1014 and ds.stats["dropped"] == overlong < 20
    assert 0.3 < ds.stats["token_fill"] <= 1.0
    it = data.BatchIterator(ds, 1024, seed=0, num_epochs=1)
    assert sum(len(real_rows(b)) for b in it) == len(ds)
