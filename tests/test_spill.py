"""Buckets that spill to disk: round trips, order within a bucket, clean-up, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from prefnoise.errors import PrefnoiseError
from prefnoise.metrics.spill import Buckets

FIELDS = [("key", "u8"), ("value", "f8"), ("flag", "?")]


@pytest.mark.parametrize("n", [1, 7])
def test_rows_come_back_per_bucket_in_order_added(n, tmp_path):
    rng = np.random.default_rng(n)
    keys = np.arange(1000, dtype=np.uint64)
    values = rng.normal(size=1000)
    bucket = (keys % n).astype(np.int64)
    with Buckets(FIELDS, n, tmp_path) as store:
        for start in range(0, 1000, 300):  # several chunks
            part = slice(start, start + 300)
            store.add({"key": keys[part], "value": values[part], "flag": values[part] > 0}, bucket[part])
        assert store.sizes.tolist() == np.bincount(bucket, minlength=n).tolist()
        assert (store.directory is None) == (n == 1)
        for i in range(n):
            got = store.read(i)
            assert got["key"].tolist() == keys[bucket == i].tolist()
            assert np.array_equal(got["value"], values[bucket == i]) and got["value"].flags.c_contiguous
            assert got["flag"].tolist() == (values[bucket == i] > 0).tolist()
            chunks = list(store.read_chunks(i, 37))
            assert all(len(c["key"]) <= 37 for c in chunks) and len(chunks) == -(-int(store.sizes[i]) // 37)
            assert np.concatenate([c["value"] for c in chunks]).tolist() == got["value"].tolist()
        assert len(list(tmp_path.iterdir())) == (1 if n > 1 else 0)
    assert list(tmp_path.iterdir()) == []  # closed: the directory is gone


def test_one_bucket_for_all_rows_and_empty_buckets(tmp_path):
    with Buckets(FIELDS, 3, tmp_path) as store:
        store.add({"key": np.array([5, 6], np.uint64), "value": np.array([0.5, 1.5]), "flag": np.array([1, 0])}, 2)
        assert store.read(0)["key"].size == 0
        assert store.read(2)["value"].tolist() == [0.5, 1.5]


def test_unusable_temp_dir_is_a_clear_error(tmp_path):
    with pytest.raises(PrefnoiseError, match="cannot create a temporary directory in .*missing"):
        Buckets(FIELDS, 2, tmp_path / "missing")
