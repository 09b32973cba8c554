"""Tests of the datasets: IDX / CIFAR parsing, checksums, splits, batching."""

import hashlib
import os
import pickle
import tarfile

import numpy as np
import pytest

from lrtrain import data


def _cfg(name, **kw):
  c = data.default_data_config()
  c.name = name
  for k, v in kw.items():
    c[k] = v
  return c


def _write_mnist_like(d, n_train=50, n_test=20, side=6, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(d, exist_ok=True)
  arrays = {"train_x": rng.integers(0, 256, (n_train, side, side)),
            "train_y": np.arange(n_train) % 10,
            "test_x": rng.integers(0, 256, (n_test, side, side)),
            "test_y": (np.arange(n_test) * 3) % 10}
  for key, stem in data.IDX_FILES.items():
    data.write_idx(os.path.join(d, stem + ".gz"), arrays[key])
  return arrays


def test_idx_round_trip_and_errors(tmp_path):
  a = np.random.default_rng(0).integers(0, 256, (4, 3, 5)).astype(np.uint8)
  for name in ("x.idx", "x.idx.gz"):
    p = str(tmp_path / name)
    data.write_idx(p, a)
    np.testing.assert_array_equal(data.read_idx(p), a)
  # hand-built header: labels file, magic 0x00000801
  p = tmp_path / "labels"
  p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  np.testing.assert_array_equal(data.read_idx(str(p)), [7, 8, 9])
  p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7, 8, 9]))
  with pytest.raises(data.DatasetError, match="holds 3 data bytes"):
    data.read_idx(str(p))
  p.write_bytes(b"PK\x03\x04junk")
  with pytest.raises(data.DatasetError, match="bad magic"):
    data.read_idx(str(p))
  p.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))
  with pytest.raises(data.DatasetError, match="unsupported"):
    data.read_idx(str(p))


def test_mnist_from_local_dir(tmp_path):
  arrays = _write_mnist_like(str(tmp_path))
  ds = data.load(_cfg("mnist", dir=str(tmp_path), validation_size=10))
  assert ds.input_shape == (6, 6, 1) and ds.num_classes == 10
  assert [ds.num_examples(s) for s in data.SPLITS] == [40, 10, 20]
  tx = ds.splits["train"][0]
  np.testing.assert_allclose(tx.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(tx.std(), 1.0, atol=1e-4)
  # test split keeps the file order and labels
  np.testing.assert_array_equal(ds.splits["test"][1], arrays["test_y"])
  mean, std = ds.meta["mean"][0], ds.meta["std"][0]
  np.testing.assert_allclose(ds.splits["test"][0][..., 0] * std + mean,
                             arrays["test_x"], atol=1e-3)
  # train + validation is a partition of the file's train set
  both = np.concatenate([ds.splits["train"][1], ds.splits["validation"][1]])
  np.testing.assert_array_equal(np.bincount(both), np.bincount(arrays["train_y"]))


def test_mnist_cache_checksum_and_download(tmp_path, monkeypatch):
  src = tmp_path / "mirror"
  _write_mnist_like(str(src))
  table = {f: hashlib.sha256((src / f).read_bytes()).hexdigest()
           for f in os.listdir(src)}
  monkeypatch.setitem(data.SHA256, "mnist", table)
  monkeypatch.setitem(data.URLS, "mnist", src.as_uri() + "/")
  cache = tmp_path / "cache"
  with pytest.raises(data.DatasetError, match="data.download=True") as e:
    data.load(_cfg("mnist", cache_dir=str(cache)))
  assert "file://" in str(e.value)
  ds = data.load(_cfg("mnist", cache_dir=str(cache), download=True, validation_size=5))
  assert ds.num_examples("test") == 20
  assert sorted(os.listdir(cache / "mnist")) == sorted(table)
  # a corrupted cached file is caught by its checksum
  p = cache / "mnist" / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(p.read_bytes())
  raw[-12] ^= 0xFF  # flip a byte of the compressed payload
  p.write_bytes(bytes(raw))
  with pytest.raises(data.DatasetError, match="checksum mismatch"):
    data.load(_cfg("mnist", cache_dir=str(cache), validation_size=5))
  # a download whose bytes do not match is rejected and not kept
  os.remove(p)
  monkeypatch.setitem(data.SHA256, "mnist", {**table, p.name: "0" * 64})
  with pytest.raises(data.DatasetError, match="checksum mismatch"):
    data.load(_cfg("mnist", cache_dir=str(cache), download=True, validation_size=5))
  assert not p.exists()
  assert not [f for f in os.listdir(cache / "mnist") if f.endswith(".part")]


def _cifar_batch(path, n, seed):
  rng = np.random.default_rng(seed)
  d = {b"batch_label": b"x", b"labels": list(rng.integers(0, 10, n)),
       b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
       b"filenames": [b"f"] * n}
  with open(path, "wb") as f:
    pickle.dump(d, f, protocol=2)
  return d


def test_cifar10_pickle_batches_dir_and_archive(tmp_path, monkeypatch):
  root = tmp_path / "cifar-10-batches-py"
  root.mkdir()
  batches = [_cifar_batch(root / f"data_batch_{i}", 6, i) for i in range(1, 6)]
  test = _cifar_batch(root / "test_batch", 4, 9)
  x, y = data.read_cifar_batch(str(root / "test_batch"))
  assert x.shape == (4, 32, 32, 3)
  # channel-major rows: the first 1024 bytes are the red plane
  np.testing.assert_array_equal(x[0, :, :, 0].ravel(), test[b"data"][0, :1024])
  np.testing.assert_array_equal(y, test[b"labels"])
  ds = data.load(_cfg("cifar10", dir=str(tmp_path), validation_size=3))
  assert ds.input_shape == (32, 32, 3) and ds.num_examples("train") == 27
  assert len(ds.meta["mean"]) == 3  # per-channel normalisation
  # the same files as a sha256-verified archive in the cache
  tgz = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(tgz, "w:gz") as tar:
    tar.add(root, arcname="cifar-10-batches-py")
  sha = hashlib.sha256(tgz.read_bytes()).hexdigest()
  monkeypatch.setitem(data.SHA256, "cifar10", {"cifar-10-python.tar.gz": sha})
  monkeypatch.setitem(data.URLS, "cifar10", tgz.as_uri())
  ds2 = data.load(_cfg("cifar10", cache_dir=str(tmp_path / "c"), download=True,
                       validation_size=3))
  np.testing.assert_array_equal(ds2.splits["test"][1], ds.splits["test"][1])
  assert sum(len(b[b"labels"]) for b in batches) == 30


def test_cifar_unpickler_refuses_code(tmp_path):
  p = tmp_path / "evil"
  with open(p, "wb") as f:
    pickle.dump({"data": os.getcwd, "labels": []}, f)
  with pytest.raises(data.DatasetError, match="refusing"):
    data.read_cifar_batch(str(p))


def test_missing_dirs_give_clear_errors(tmp_path):
  with pytest.raises(data.DatasetError, match="data.dir=.*has no train-images"):
    data.load(_cfg("fashion_mnist", dir=str(tmp_path)))
  with pytest.raises(data.DatasetError, match="cifar-10-batches-py"):
    data.load(_cfg("cifar10", dir=str(tmp_path)))
  with pytest.raises(data.DatasetError, match="text_file"):
    data.load(_cfg("chars", text_file=str(tmp_path / "none.txt")))
  with pytest.raises(ValueError, match="valid: digits"):
    data.load(_cfg("imagenet"))
  # a missing Fashion-MNIST names the apt package, directory and URL
  with pytest.raises(data.DatasetError) as e:
    data.fetch("fashion_mnist", str(tmp_path / "nocache"), download=False)
  msg = str(e.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert data.FASHION_MNIST_DEB_DIR in msg and "http" in msg
  assert issubclass(data.DatasetError, FileNotFoundError)


def test_digits_splits_and_train_stream_determinism():
  ds = data.load(_cfg("digits", validation_size=100, max_train=500))
  assert ds.input_shape == (8, 8, 1) and ds.task == "classification"
  assert [ds.num_examples(s) for s in data.SPLITS] == [500, 100, 359]
  a = [b["y"] for b, _ in zip(ds.batches("train", 64, seed=3), range(12))]
  b = [b["y"] for b, _ in zip(ds.batches("train", 64, seed=3, start_step=5), range(7))]
  for u, v in zip(a[5:], b):
    np.testing.assert_array_equal(u, v)  # resuming needs only start_step
  c = next(ds.batches("train", 64, seed=4))["y"]
  assert not np.array_equal(a[0], c)
  # every example appears exactly once per epoch (500 = 7 * 64 + 52)
  xs = np.concatenate([b["x"] for b, _ in zip(ds.batches("train", 100, seed=0), range(5))])
  flat = xs.reshape(500, -1)
  assert len(np.unique(flat, axis=0)) == len(np.unique(ds.splits["train"][0].reshape(500, -1),
                                                       axis=0))
  # eval: one ordered pass with a final partial batch
  sizes = [len(b["y"]) for b in ds.batches("test", 100, seed=0)]
  assert sizes == [100, 100, 100, 59]
  np.testing.assert_array_equal(
      np.concatenate([b["y"] for b in ds.batches("test", 100, seed=0)]), ds.splits["test"][1])
  # the test split does not depend on data.seed
  ds2 = data.load(_cfg("digits", seed=5))
  np.testing.assert_array_equal(ds2.splits["test"][1], ds.splits["test"][1])
  with pytest.raises(ValueError, match="unknown split"):
    ds.batches("dev", 4, seed=0)


def test_classes_subset_is_remapped():
  ds = data.load(_cfg("digits", classes=(3, 7), validation_size=20))
  assert ds.num_classes == 2
  for s in data.SPLITS:
    assert set(np.unique(ds.splits[s][1])) == {0, 1}


def test_lowrank_regression_teacher():
  ds = data.load(_cfg("lowrank_regression", validation_size=64))
  W = ds.meta["W"]
  s = np.linalg.svd(W, compute_uv=False)
  assert ds.meta["rank"] == 4 and np.sum(s > 1e-5) == 4
  x, y = ds.splits["test"]
  assert np.mean((x @ W.T - y) ** 2) < 2e-4  # noise 0.01
  assert ds.task == "regression" and ds.num_classes == y.shape[1] == 32


def test_teacher_student_targets():
  ds = data.teacher_student(0, num_train=256, num_eval=64)
  x, y = ds.splits["train"]
  np.testing.assert_allclose(np.tanh(x @ ds.meta["W1"].T) @ ds.meta["W2"].T, y, atol=1e-5)
  assert np.linalg.matrix_rank(ds.meta["W1"]) == 4


def test_chars_windows_shift_by_one(tmp_path):
  p = tmp_path / "t.txt"
  p.write_text("abcdefghij" * 200)
  ds = data.load(_cfg("chars", text_file=str(p), validation_size=2))
  assert ds.task == "lm" and ds.num_classes == 10
  T = ds.input_shape[0]
  b = next(ds.batches("train", 8, seed=0))
  assert b["x"].shape == (8, T) and b["y"].shape == (8, T)
  np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])
  np.testing.assert_array_equal((b["x"] + 1) % 10, b["y"])  # 'a'->'b'->...
  assert ds.num_examples("validation") >= 1 and ds.num_examples("test") >= 1


def test_chars_default_corpus():
  if not os.path.isdir(data.COMMON_LICENSES_DIR):
    pytest.skip("no /usr/share/common-licenses")
  ds = data.load(_cfg("chars"))
  assert ds.num_classes > 40 and ds.num_examples("train") > 10_000


def test_mnist1d():
  state = np.random.get_state()[1].copy()
  ds = data.load(_cfg("mnist1d", validation_size=100))
  np.testing.assert_array_equal(np.random.get_state()[1], state)  # no side effect
  assert ds.input_shape == (40,) and ds.num_classes == 10
  assert [ds.num_examples(s) for s in data.SPLITS] == [3900, 100, 1000]
  x = ds.splits["train"][0]
  assert abs(float(x.mean())) < 0.1 and 0.8 < float(x.std()) < 1.2


@pytest.mark.fashion_mnist
def test_fashion_mnist_debian_package():
  ds = data.load(_cfg("fashion_mnist", max_train=1000))
  assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10
  assert ds.num_examples("test") == 10_000 and ds.num_examples("train") == 1000
  assert ds.meta["source"] == data.FASHION_MNIST_DEB_DIR
  assert set(np.unique(ds.splits["test"][1])) == set(range(10))
