"""Host-side datasets: numpy arrays, deterministic batch iterators.

`load(data_cfg) -> Dataset`. Splits are 'train', 'validation', 'test'.
Train batches are an infinite stream that depends only on (seed, step):
epoch e is the permutation `default_rng([seed, e])` of the train set, and
batch `step` holds positions [step * B, (step + 1) * B) of the concatenated
epochs, so a resumed run needs only `start_step`. Validation and test are one
ordered pass with a final partial batch.

Images are float32 NHWC in [0, 1] standardised with the train split's mean
and std (per channel); labels are int32. Sources (facts in
third_party/datasets.md): scikit-learn digits (bundled), Fashion-MNIST (the
Debian package dataset-fashion-mnist, a directory, or a download), MNIST and
CIFAR-10 (a directory or a sha256-verified download into a cache), MNIST-1D
(the mnist1d package), synthetic regression tasks, a char-level corpus and
two token streams for language models: `text` (UTF-8 bytes of a text file or
of the World English Bible from the Debian package sword-text-web) and
`tokens` (a flat binary file of token ids, read through np.memmap). Their
train batches are random windows drawn from (seed, step); the tail of the
stream (data.holdout_fraction) is held out: validation, then test.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import html
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.request
from typing import Callable, Iterator

import numpy as np

NAMES = ("digits", "fashion_mnist", "mnist", "cifar10", "mnist1d",
         "lowrank_regression", "teacher_student", "chars", "text", "tokens")
LM_NAMES = ("chars", "text", "tokens")  # token sequences (task 'lm')
SPLITS = ("train", "validation", "test")
FASHION_MNIST_DEB_DIR = "/usr/share/datasets/fashion-mnist"
COMMON_LICENSES_DIR = "/usr/share/common-licenses"
DEFAULT_SEQ_LEN = 64          # chars: tokens per example window
# text: the default corpus, a SWORD zText module (third_party/text_corpus.md).
WEB_PACKAGE = "sword-text-web"
WEB_DIR = "/usr/share/sword/modules/texts/ztext/engWEB2015eb"
BYTE_VOCAB = 256              # text: one token per UTF-8 byte
TOKEN_DTYPES = ("uint16", "uint32")   # tokens: data.token_dtype
IDX_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}

# Download sources and sha256 of the archives (third_party/datasets.md).
URLS = {
    "mnist": "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
}
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
    "cifar10": {
        "cifar-10-python.tar.gz":
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    },
}


class DatasetError(FileNotFoundError):
  """A dataset that cannot be read: the message says what to do."""


# --------------------------------------------------------------------------
# Dataset and batching.
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
  """Arrays per split plus metadata.

  Attributes:
    name: data.name.
    task: 'classification' | 'regression' | 'lm'.
    num_classes: classes, vocabulary size (lm) or output dimension (regression).
    input_shape: shape of one example x.
    splits: {split: (x, y)} numpy arrays with the example axis first; for
      'lm' x holds window start offsets into `tokens` (see `take`).
    tokens: the token stream of an lm dataset (None otherwise).
    seq_len: window length T of an lm dataset.
    meta: extra facts (source path, normalisation, vocabulary, teacher).
  """
  name: str
  task: str
  num_classes: int
  input_shape: tuple
  splits: dict
  tokens: np.ndarray | None = None
  seq_len: int = 0
  meta: dict = dataclasses.field(default_factory=dict)

  def num_examples(self, split: str) -> int:
    """Examples in `split`."""
    return len(self._split(split)[0])

  def _split(self, split):
    if split not in self.splits:
      raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    return self.splits[split]

  def take(self, split: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The examples `idx` of `split` as {'x', 'y'}."""
    x, y = self._split(split)
    if self.task == "lm":
      return self.windows(x[idx])
    return {"x": x[idx], "y": y[idx]}

  def windows(self, starts: np.ndarray) -> dict[str, np.ndarray]:
    """lm: the token windows at `starts`, x = w[:, :-1], y = w[:, 1:] (int32;
    from a memmap only these rows are read)."""
    win = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)[None, :]
    w = np.asarray(self.tokens[win], np.int32)
    return {"x": w[:, :-1], "y": w[:, 1:]}

  def batches(self, split: str, batch_size: int, *, seed: int, start_step: int = 0,
              shuffle: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches {'x', 'y'} of `split`.

    Args:
      split: 'train' (infinite, deterministic in (seed, step)) or
        'validation' / 'test' (one ordered pass, final partial batch).
      batch_size: examples per batch.
      seed: shuffling seed of the train stream.
      start_step: first batch index (resume).
      shuffle: permute the train set each epoch (default: True for 'train',
        False otherwise; an eval split with shuffle=True is permuted once).

    Returns:
      An iterator of dicts of numpy arrays.

    Raises:
      ValueError: unknown split or batch_size < 1.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = self.num_examples(split)
    if n == 0:
      raise ValueError(f"{self.name}: split {split!r} is empty")
    shuffle = (split == "train") if shuffle is None else shuffle
    if split == "train":
      return self._train_stream(n, batch_size, seed, start_step, shuffle)
    order = np.random.default_rng([seed, 1 << 20]).permutation(n) if shuffle else None
    return self._one_pass(split, n, batch_size, start_step, order)

  def _train_stream(self, n, bs, seed, start_step, shuffle):
    cache: dict[int, np.ndarray] = {}

    def perm(e):
      if e not in cache:
        cache.clear() if len(cache) > 2 else None
        cache[e] = (np.random.default_rng([seed, e]).permutation(n) if shuffle
                    else np.arange(n))
      return cache[e]

    step = start_step
    while True:
      pos = step * bs + np.arange(bs)
      epochs, within = np.divmod(pos, n)
      idx = np.empty(bs, np.int64)
      for e in np.unique(epochs):
        sel = epochs == e
        idx[sel] = perm(int(e))[within[sel]]
      yield self.take("train", idx)
      step += 1

  def _one_pass(self, split, n, bs, start_step, order):
    for lo in range(start_step * bs, n, bs):
      idx = np.arange(lo, min(lo + bs, n))
      yield self.take(split, idx if order is None else order[idx])


@dataclasses.dataclass
class TokenStream(Dataset):
  """An lm dataset over one token stream (`text`, `tokens`).

  Train windows are drawn at random, batch `step` from
  `default_rng([seed, step])`: start offsets uniform over the
  `num_examples('train')` windows that end before the held-out tail, so a
  resumed run needs only its step and the stream costs nothing per epoch
  (a window may repeat). Validation and test hold fixed windows
  (`splits`), one ordered pass as for the other datasets.

  Attributes:
    train_windows: window start offsets 0 .. train_windows - 1 are train.
  """
  train_windows: int = 0

  def num_examples(self, split: str) -> int:
    if split == "train":
      return self.train_windows
    return super().num_examples(split)

  def _train_stream(self, n, bs, seed, start_step, shuffle):
    del shuffle               # random windows either way
    step = start_step
    while True:
      starts = np.random.default_rng([seed, step]).integers(0, n, bs)
      yield self.take("train", starts)
      step += 1

  def take(self, split: str, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Train: the windows starting at offsets `idx`; else as `Dataset.take`."""
    if split != "train":
      return super().take(split, idx)
    return self.windows(idx)


# --------------------------------------------------------------------------
# Files: IDX, CIFAR-10 pickles, checksums, downloads.
# --------------------------------------------------------------------------


def sha256sum(path: str) -> str:
  """Hex sha256 of a file."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def verify(path: str, expected: str) -> None:
  """Raises DatasetError (after deleting nothing) if sha256(path) != expected."""
  got = sha256sum(path)
  if got != expected:
    raise DatasetError(
        f"checksum mismatch for {path}: sha256 {got}, expected {expected} "
        "(third_party/datasets.md). The file is corrupt or not the canonical "
        "one: delete it and download again (data.download=True), or point "
        "data.dir at a directory with the right files")


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally .gz) of unsigned bytes as a numpy array.

  Raises:
    DatasetError: bad magic number, unsupported type or truncated data.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DatasetError(f"cannot read IDX file {path}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DatasetError(f"{path} is not an IDX file (bad magic number)")
  dtype_code, ndim = raw[2], raw[3]
  if dtype_code != 0x08:
    raise DatasetError(f"{path}: IDX type 0x{dtype_code:02x} unsupported "
                       "(only unsigned bytes, 0x08)")
  head = 4 + 4 * ndim
  if len(raw) < head:
    raise DatasetError(f"{path}: truncated IDX header")
  shape = struct.unpack(f">{ndim}I", raw[4:head])
  size = int(np.prod(shape)) if ndim else 1
  if len(raw) - head != size:
    raise DatasetError(f"{path}: IDX header says shape {shape} ({size} bytes) "
                       f"but the file holds {len(raw) - head} data bytes")
  return np.frombuffer(raw, np.uint8, size, head).reshape(shape)


def write_idx(path: str, a: np.ndarray) -> None:
  """Write a uint8 array as IDX (gzip if path ends in .gz); for tests/tools."""
  a = np.asarray(a, np.uint8)
  data = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)


def _find_idx(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
    p = os.path.join(directory, name)
    if os.path.isfile(p):
      return p
  return None


def _download(url: str, dest: str, sha: str) -> None:
  """Fetch url to dest atomically, verifying sha256 before the rename."""
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
  try:
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as r:
      shutil.copyfileobj(r, out)
    verify(tmp, sha)
    os.replace(tmp, dest)
  except DatasetError:
    raise
  except OSError as e:
    raise DatasetError(
        f"downloading {url} failed ({e}); on a machine without internet put "
        f"the file at {dest} or set data.dir to a directory holding it") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def default_cache_dir() -> str:
  """$LRTRAIN_DATA, else $XDG_CACHE_HOME/lrtrain, else ~/.cache/lrtrain."""
  if os.environ.get("LRTRAIN_DATA"):
    return os.environ["LRTRAIN_DATA"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "lrtrain")


def _cache(cfg, name: str) -> str:
  return os.path.join(cfg.cache_dir or default_cache_dir(), name)


def fetch(name: str, cache_dir: str, download: bool) -> str:
  """Directory with `name`'s canonical archives in the cache, verified.

  Files already present in the cache are checked against SHA256[name];
  missing ones are downloaded when `download` is True.

  Raises:
    DatasetError: a missing file without download, a failed download, or a
      checksum mismatch.
  """
  for fname, sha in SHA256[name].items():
    dest = os.path.join(cache_dir, fname)
    url = URLS[name] if URLS[name].endswith(".tar.gz") else URLS[name] + fname
    if not os.path.isfile(dest):
      if not download:
        raise DatasetError(
            f"{name}: {dest} not found. "
            + (f"Install the Debian package (apt-get install "
               f"dataset-fashion-mnist; files in {FASHION_MNIST_DEB_DIR}), or "
               "set" if name == "fashion_mnist" else "Set")
            + " data.dir to a directory that holds the files, or set "
            f"data.download=True on a connected machine to fetch {url} "
            "(sha256-verified)")
      _download(url, dest, sha)
    else:
      verify(dest, sha)
  return cache_dir


def _idx_dir(cfg, name: str, default_dirs: tuple[str, ...] = ()) -> str:
  """The directory to read `name`'s IDX files from (module docstring)."""
  if cfg.dir:
    if _find_idx(cfg.dir, IDX_FILES["train_x"]) is None:
      raise DatasetError(
          f"{name}: data.dir={cfg.dir!r} has no {IDX_FILES['train_x']}[.gz]; "
          "it must hold the four IDX files "
          f"({', '.join(v + '.gz' for v in IDX_FILES.values())})")
    return cfg.dir
  for d in default_dirs:
    if _find_idx(d, IDX_FILES["train_x"]) is not None:
      return d
  return fetch(name, _cache(cfg, name), cfg.download)


def load_idx_dir(directory: str) -> dict[str, np.ndarray]:
  """The four MNIST-style IDX arrays of a directory.

  Raises:
    DatasetError: missing files, bad IDX data or inconsistent shapes.
  """
  out = {}
  for key, stem in IDX_FILES.items():
    p = _find_idx(directory, stem)
    if p is None:
      raise DatasetError(f"{directory} lacks {stem}[.gz] (needed: "
                         f"{', '.join(IDX_FILES.values())})")
    out[key] = read_idx(p)
  for s in ("train", "test"):
    x, y = out[f"{s}_x"], out[f"{s}_y"]
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise DatasetError(f"{directory}: {s} images {x.shape} and labels "
                         f"{y.shape} do not match (expected (N, h, w) and (N,))")
  return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Loads CIFAR-10 batches (dicts, lists, numpy arrays) and nothing else."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
              ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
              ("_codecs", "encode")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A CIFAR-10 python batch -> (N, 32, 32, 3) uint8 images, (N,) labels.

  Raises:
    DatasetError: unreadable file or missing 'data' / 'labels' entries.
  """
  try:
    with open(path, "rb") as f:
      d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
  except (OSError, pickle.UnpicklingError, EOFError) as e:
    raise DatasetError(f"cannot read CIFAR-10 batch {path}: {e}") from None
  d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
  if "data" not in d or "labels" not in d:
    raise DatasetError(f"{path}: not a CIFAR-10 batch (no 'data'/'labels')")
  x = np.asarray(d["data"], np.uint8)
  y = np.asarray(d["labels"], np.int64)
  if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
    raise DatasetError(f"{path}: data {x.shape} / labels {y.shape} are not "
                       "(N, 3072) / (N,)")
  return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _cifar_batches_dir(cfg) -> str:
  if cfg.dir:
    for d in (os.path.join(cfg.dir, "cifar-10-batches-py"), cfg.dir):
      if os.path.isfile(os.path.join(d, "data_batch_1")):
        return d
    raise DatasetError(f"cifar10: data.dir={cfg.dir!r} holds neither "
                       "data_batch_1..5 + test_batch nor cifar-10-batches-py/")
  cache = _cache(cfg, "cifar10")
  out = os.path.join(cache, "cifar-10-batches-py")
  if os.path.isfile(os.path.join(out, "test_batch")):
    return out
  fetch("cifar10", cache, cfg.download)
  with tarfile.open(os.path.join(cache, "cifar-10-python.tar.gz")) as tar:
    tar.extractall(cache, filter="data")
  return out


# --------------------------------------------------------------------------
# Splitting and normalisation.
# --------------------------------------------------------------------------


def _select_classes(x, y, classes):
  """The examples of `classes` (data.classes), labels renumbered 0..k-1.

  Raises:
    ValueError: a class with no example (naming the dataset's labels).
  """
  if not classes:
    return x, y
  classes = list(classes)
  missing = sorted(set(classes) - set(np.unique(y).tolist()))
  if missing:
    raise ValueError(
        f"data.classes={tuple(classes)}: no example has label "
        f"{', '.join(map(str, missing))}; this dataset's labels are "
        f"{int(y.min())}..{int(y.max())} (() keeps all classes)")
  keep = np.isin(y, classes)
  remap = np.full(int(max(y.max(), max(classes))) + 1, -1, np.int64)
  remap[classes] = np.arange(len(classes))
  return x[keep], remap[y[keep]]


def _split_train(cfg, x, y):
  """Validation = validation_size examples chosen by data.seed; then max_train."""
  n = len(x)
  v = int(cfg.validation_size)
  if not 0 <= v < n:
    raise ValueError(f"data.validation_size={v} must be in [0, {n})")
  perm = np.random.default_rng(int(cfg.seed)).permutation(n)
  vi, ti = np.sort(perm[:v]), np.sort(perm[v:])
  if cfg.max_train:
    ti = ti[:int(cfg.max_train)]
  return (x[ti], y[ti]), (x[vi], y[vi])


def _image_dataset(cfg, name, train_x, train_y, test_x, test_y) -> Dataset:
  """uint8-range or float images -> standardised float32 NHWC splits."""
  train_x, train_y = _select_classes(train_x, train_y, cfg.classes)
  test_x, test_y = _select_classes(test_x, test_y, cfg.classes)
  if train_x.ndim == 3:
    train_x, test_x = train_x[..., None], test_x[..., None]
  (tx, ty), (vx, vy) = _split_train(cfg, train_x, train_y)
  tx = tx.astype(np.float32)
  axes = tuple(range(tx.ndim - 1))
  mean = tx.mean(axis=axes)
  std = tx.std(axis=axes) + 1e-8
  norm = lambda a: ((a.astype(np.float32) - mean) / std).astype(np.float32)
  num_classes = len(cfg.classes) if cfg.classes else int(max(train_y.max(), test_y.max())) + 1
  splits = {"train": (norm(tx), ty.astype(np.int32)),
            "validation": (norm(vx), vy.astype(np.int32)),
            "test": (norm(test_x), test_y.astype(np.int32))}
  return Dataset(name, "classification", num_classes, tuple(tx.shape[1:]), splits,
                 meta={"mean": mean.tolist(), "std": std.tolist()})


# --------------------------------------------------------------------------
# Loaders.
# --------------------------------------------------------------------------


def _digits(cfg) -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  x = d.images.astype(np.float32) / 16.0
  y = d.target.astype(np.int64)
  # A fixed test split (seed 0, 20%), independent of data.seed, so every run
  # reports on the same test examples.
  perm = np.random.default_rng(0).permutation(len(x))
  n_test = len(x) // 5
  te, tr = np.sort(perm[:n_test]), np.sort(perm[n_test:])
  return _image_dataset(cfg, "digits", x[tr], y[tr], x[te], y[te])


def _fashion_mnist(cfg) -> Dataset:
  d = _idx_dir(cfg, "fashion_mnist", (FASHION_MNIST_DEB_DIR,))
  a = load_idx_dir(d)
  ds = _image_dataset(cfg, "fashion_mnist", a["train_x"], a["train_y"],
                      a["test_x"], a["test_y"])
  ds.meta["source"] = d
  return ds


def _mnist(cfg) -> Dataset:
  d = _idx_dir(cfg, "mnist")
  a = load_idx_dir(d)
  ds = _image_dataset(cfg, "mnist", a["train_x"], a["train_y"], a["test_x"], a["test_y"])
  ds.meta["source"] = d
  return ds


def _cifar10(cfg) -> Dataset:
  d = _cifar_batches_dir(cfg)
  parts = [read_cifar_batch(os.path.join(d, f"data_batch_{i}")) for i in range(1, 6)
           if os.path.isfile(os.path.join(d, f"data_batch_{i}"))]
  if not os.path.isfile(os.path.join(d, "test_batch")):
    raise DatasetError(f"cifar10: {d} lacks test_batch")
  tx, ty = read_cifar_batch(os.path.join(d, "test_batch"))
  x = np.concatenate([p[0] for p in parts])
  y = np.concatenate([p[1] for p in parts])
  ds = _image_dataset(cfg, "cifar10", x, y, tx, ty)
  ds.meta["source"] = d
  return ds


def _mnist1d(cfg) -> Dataset:
  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=g-import-not-at-top
  args = get_dataset_args()  # the canonical 4000 / 1000 split, seed 42
  # make_dataset seeds numpy's global generator; restore it afterwards.
  state = np.random.get_state()
  try:
    d = make_dataset(args)
  finally:
    np.random.set_state(state)
  x, y = np.asarray(d["x"], np.float32), np.asarray(d["y"], np.int64)
  x, y = _select_classes(x, y, cfg.classes)
  xt, yt = _select_classes(np.asarray(d["x_test"], np.float32),
                           np.asarray(d["y_test"], np.int64), cfg.classes)
  (tx, ty), (vx, vy) = _split_train(cfg, x, y)
  num_classes = len(cfg.classes) if cfg.classes else 10
  splits = {"train": (tx, ty.astype(np.int32)), "validation": (vx, vy.astype(np.int32)),
            "test": (xt, yt.astype(np.int32))}
  return Dataset("mnist1d", "classification", num_classes, tuple(tx.shape[1:]), splits)


def lowrank_regression(seed: int, *, m: int = 64, n: int = 32, rank: int = 4,
                       num_train: int = 4096, num_eval: int = 1024,
                       noise: float = 0.01, validation_size: int = 0,
                       max_train: int = 0) -> Dataset:
  """y = x W*^T + noise with a teacher W* (n, m) of rank `rank`.

  W* = U diag(s) V^T with orthonormal U, V and s = 1, 2, ..., rank (scaled
  to unit top value) so its spectrum is known; x ~ N(0, I_m).

  Returns:
    A regression Dataset; meta['W'] holds W* and meta['rank'] its rank.
  """
  rng = np.random.default_rng([int(seed), 7])
  U = np.linalg.qr(rng.normal(size=(n, rank)))[0]
  V = np.linalg.qr(rng.normal(size=(m, rank)))[0]
  s = np.arange(rank, 0, -1, dtype=np.float64) / rank
  W = (U * s) @ V.T
  total = num_train + validation_size + 2 * num_eval
  x = rng.normal(size=(total, m))
  y = x @ W.T + noise * rng.normal(size=(total, n))
  x, y = x.astype(np.float32), y.astype(np.float32)
  tr = slice(0, num_train)
  va = slice(num_train, num_train + (validation_size or num_eval))
  te = slice(total - num_eval, total)
  ti = np.arange(num_train)[:max_train or None]
  splits = {"train": (x[tr][ti], y[tr][ti]), "validation": (x[va], y[va]),
            "test": (x[te], y[te])}
  return Dataset("lowrank_regression", "regression", n, (m,), splits,
                 meta={"W": W.astype(np.float32), "rank": rank, "noise": noise})


def teacher_student(seed: int, *, m: int = 32, hidden: int = 64, out: int = 8,
                    rank: int = 4, num_train: int = 4096, num_eval: int = 1024,
                    validation_size: int = 0, max_train: int = 0) -> Dataset:
  """Regression onto a random teacher MLP y = W2 tanh(W1 x) with rank(W1) = rank.

  Returns:
    A regression Dataset; meta holds the teacher weights W1 (hidden, m) and
    W2 (out, hidden).
  """
  rng = np.random.default_rng([int(seed), 11])
  W1 = rng.normal(size=(hidden, rank)) @ rng.normal(size=(rank, m)) / np.sqrt(rank * m)
  W1 *= 2.0  # pre-activations of std ~2 put tanh in its nonlinear range
  W2 = rng.normal(size=(out, hidden)) / np.sqrt(hidden)
  total = num_train + (validation_size or num_eval) + num_eval
  x = rng.normal(size=(total, m))
  y = np.tanh(x @ W1.T) @ W2.T
  x, y = x.astype(np.float32), y.astype(np.float32)
  n_val = validation_size or num_eval
  ti = np.arange(num_train)[:max_train or None]
  splits = {"train": (x[ti], y[ti]),
            "validation": (x[num_train:num_train + n_val], y[num_train:num_train + n_val]),
            "test": (x[total - num_eval:], y[total - num_eval:])}
  return Dataset("teacher_student", "regression", out, (m,), splits,
                 meta={"W1": W1.astype(np.float32), "W2": W2.astype(np.float32)})


def read_text(path: str = "") -> str:
  """The text of `path`, or of every file under /usr/share/common-licenses.

  Raises:
    DatasetError: the file or directory is missing or empty.
  """
  if path:
    if not os.path.isfile(path):
      raise DatasetError(f"chars: data.text_file={path!r} does not exist; "
                         "point it at a UTF-8 text file")
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  else:
    d = COMMON_LICENSES_DIR
    if not os.path.isdir(d):
      raise DatasetError(f"chars: default corpus {d} is missing (Debian package "
                         "base-files); set data.text_file to a text file")
    seen, parts = set(), []
    for name in sorted(os.listdir(d)):
      real = os.path.realpath(os.path.join(d, name))
      if real in seen or not os.path.isfile(real):
        continue  # symlinks such as GPL -> GPL-3 would repeat a text
      seen.add(real)
      with open(real, encoding="utf-8", errors="replace") as f:
        parts.append(f.read())
    text = "\n".join(parts)
  if not text:
    raise DatasetError(f"chars: corpus {path or COMMON_LICENSES_DIR} is empty")
  return text


def chars(cfg, seq_len: int = DEFAULT_SEQ_LEN) -> Dataset:
  """Char-level LM: x, y are (T,) int windows of the corpus shifted by one.

  The last 10% of the text is the test split, the `validation_size` windows
  before it (at most 10% of the text) are validation, the rest is train.
  Train windows start at every offset; eval windows do not overlap.
  """
  text = read_text(cfg.text_file)
  vocab = sorted(set(text))
  lut = {c: i for i, c in enumerate(vocab)}
  tokens = np.fromiter((lut[c] for c in text), np.int32, len(text))
  L, T = len(tokens), int(seq_len)
  n_test = L // 10
  n_val = min(int(cfg.validation_size) * T, L // 10)
  train_end = L - n_test - n_val
  if train_end < T + 1 or n_test < T + 1:
    raise DatasetError(f"chars: corpus of {L} characters is too short for "
                       f"windows of {T}")
  train = np.arange(0, train_end - T)
  if cfg.max_train:
    train = train[:int(cfg.max_train)]
  val = np.arange(train_end, train_end + n_val - T, T)
  test = np.arange(L - n_test, L - T, T)
  dummy = lambda a: np.zeros(len(a), np.int32)  # y comes from the tokens
  splits = {"train": (train, dummy(train)), "validation": (val, dummy(val)),
            "test": (test, dummy(test))}
  return Dataset("chars", "lm", len(vocab), (T,), splits, tokens=tokens, seq_len=T,
                 meta={"vocab": "".join(vocab), "source": cfg.text_file or COMMON_LICENSES_DIR})


# --------------------------------------------------------------------------
# Token streams: byte-level text and token files.
# --------------------------------------------------------------------------


def encode_bytes(text: str) -> np.ndarray:
  """Byte-level tokens of `text`: its UTF-8 bytes as uint8 (vocabulary 256)."""
  return np.frombuffer(text.encode("utf-8"), np.uint8)


def decode_bytes(tokens) -> str:
  """The text of byte-level tokens; bytes that are no valid UTF-8 (a window
  cut inside a character) decode to U+FFFD.

  Raises:
    ValueError: a token outside 0..255.
  """
  a = np.asarray(tokens)
  if a.size and (a.min() < 0 or a.max() >= BYTE_VOCAB):
    raise ValueError(f"byte tokens must be in [0, {BYTE_VOCAB}), got "
                     f"{a.min()}..{a.max()}")
  return a.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_OSIS_WORD = re.compile(r"</?w\b[^>]*>")
_OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_OSIS_BREAK = re.compile(
    r"</?(?:title|div|lb|l|lg|chapter|item|list|speaker)\b[^>]*>")
_OSIS_TAG = re.compile(r"<[^>]*>")


def _drop_note(m: re.Match) -> str:
  """A footnote between two letters leaves a space (it separated words)."""
  s = m.string
  before, after = s[m.start() - 1:m.start()], s[m.end():m.end() + 1]
  return " " if before.isalnum() and after.isalnum() else ""


def osis_to_text(osis: str) -> str:
  """Plain text of OSIS markup: footnotes dropped, paragraph, line, title,
  chapter and list markers as line breaks, other tags removed, entities
  unescaped, blanks collapsed, empty lines dropped."""
  s = _OSIS_NOTE.sub(_drop_note, _OSIS_WORD.sub("", osis))
  s = html.unescape(_OSIS_TAG.sub("", _OSIS_BREAK.sub("\n", s)))
  lines = (" ".join(line.split()) for line in s.split("\n"))
  return "\n".join(line for line in lines if line) + "\n"


def _read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_sword_ztext(directory: str) -> str:
  """The plain text of a SWORD zText Bible module, Old then New Testament.

  Per testament t, t.bzs holds one (offset, compressed size, size) uint32
  triple per zlib block of t.bzz, and t.bzv one (block, offset, size)
  (uint32, uint32, uint16) entry per verse inside the decompressed blocks;
  the verses, joined by spaces, are OSIS markup (`osis_to_text`).

  Raises:
    DatasetError: a missing or corrupt module file.
  """
  import zlib  # pylint: disable=g-import-not-at-top
  verses = []
  for t in ("ot", "nt"):
    try:
      bzs, bzv, bzz = (_read_bytes(os.path.join(directory, f"{t}.{ext}"))
                       for ext in ("bzs", "bzv", "bzz"))
    except OSError as e:
      raise DatasetError(f"cannot read the SWORD module in {directory}: {e}; "
                         f"reinstall it (apt-get install --reinstall -y "
                         f"{WEB_PACKAGE})") from None
    try:
      blocks = []
      for off, size, usize in struct.iter_unpack("<III", bzs):
        blocks.append(zlib.decompress(bzz[off:off + size]))
        if len(blocks[-1]) != usize:
          raise ValueError(f"block {len(blocks) - 1} holds {len(blocks[-1])} "
                           f"bytes, its index says {usize}")
      verses += [blocks[b][off:off + size]
                 for b, off, size in struct.iter_unpack("<IIH", bzv) if size]
    except (struct.error, zlib.error, IndexError, ValueError) as e:
      raise DatasetError(f"{directory}: corrupt SWORD zText module ({t}: {e}); "
                         f"reinstall it (apt-get install --reinstall -y "
                         f"{WEB_PACKAGE})") from None
  return osis_to_text(b" ".join(verses).decode("utf-8", errors="replace"))


def token_stream(name: str, tokens: np.ndarray, vocab: int, cfg,
                 meta: dict) -> TokenStream:
  """The `TokenStream` of `tokens` with windows of data.seq_len.

  The last data.holdout_fraction of the stream is held out: its first half
  is validation, the second test, each read as windows starting every T
  tokens (at most data.validation_size of them, evenly spread; 0 = all).
  Train windows lie before it (the first data.max_train offsets if > 0).

  Raises:
    ValueError: data.holdout_fraction outside (0, 1).
    DatasetError: a stream too short for a window in each split.
  """
  L, T = len(tokens), int(cfg.seq_len)
  frac = float(cfg.holdout_fraction)
  if not 0.0 < frac < 1.0:
    raise ValueError(f"data.holdout_fraction={frac} must be in (0, 1)")
  held = int(L * frac)
  val_lo, test_lo = L - held, L - held + held // 2
  n_val, n_test = (test_lo - val_lo - 1) // T, (L - test_lo - 1) // T
  if min(n_val, n_test, val_lo - T) < 1:
    raise DatasetError(
        f"{name}: a stream of {L} tokens with data.holdout_fraction={frac} "
        f"has no room for a train, a validation and a test window of "
        f"{T + 1} tokens; use a longer corpus, lower data.seq_len or change "
        "data.holdout_fraction")
  cap = int(cfg.validation_size)

  def starts(lo, n):
    i = np.arange(n) if cap <= 0 or cap >= n else (np.arange(cap) * n) // cap
    return lo + T * i

  train = val_lo - T
  if cfg.max_train:
    train = min(train, int(cfg.max_train))
  splits = {s: (x, np.zeros(len(x), np.int32)) for s, x in
            (("validation", starts(val_lo, n_val)), ("test", starts(test_lo, n_test)))}
  return TokenStream(name, "lm", vocab, (T,), splits, tokens=tokens, seq_len=T,
                     meta=meta, train_windows=train)


def _text(cfg) -> TokenStream:
  """Byte-level LM on data.text_file, or on the World English Bible
  (WEB_DIR, Debian package sword-text-web; third_party/text_corpus.md).

  Raises:
    DatasetError: the file or the default corpus is missing.
  """
  path = cfg.text_file
  if path:
    if not os.path.isfile(path):
      raise DatasetError(f"text: data.text_file={path!r} does not exist; point "
                         "it at a UTF-8 text file ('' = the default corpus)")
    tokens = np.fromfile(path, np.uint8)
  else:
    if not os.path.isdir(WEB_DIR):
      raise DatasetError(
          f"text: the default corpus {WEB_DIR} is missing; install it with "
          f"`apt-get install -y {WEB_PACKAGE}` (the World English Bible, "
          "public domain) or set data.text_file to a UTF-8 text file")
    tokens = encode_bytes(read_sword_ztext(WEB_DIR))
    path = WEB_DIR
  return token_stream("text", tokens, BYTE_VOCAB, cfg,
                      {"source": path, "byte_level": True})


def read_token_file(path: str, dtype: str) -> np.memmap:
  """A flat little-endian binary file of token ids, memory-mapped.

  Raises:
    ValueError: dtype not in TOKEN_DTYPES.
    DatasetError: no path, a missing file, or a size that is not a whole
      number of ids.
  """
  if dtype not in TOKEN_DTYPES:
    raise ValueError(f"unknown data.token_dtype={dtype!r}; valid: "
                     f"{', '.join(TOKEN_DTYPES)}")
  if not path:
    raise DatasetError("tokens: set data.token_file to a flat binary file of "
                       "token ids (data.token_dtype each, little-endian, no header)")
  if not os.path.isfile(path):
    raise DatasetError(f"tokens: data.token_file={path!r} does not exist")
  dt = np.dtype(dtype).newbyteorder("<")
  size = os.path.getsize(path)
  if size == 0 or size % dt.itemsize:
    raise DatasetError(f"tokens: data.token_file={path!r} holds {size} bytes, "
                       f"not a whole number of {dtype} token ids; check "
                       "data.token_dtype")
  return np.memmap(path, dtype=dt, mode="r")


def check_token_ids(tokens: np.ndarray, vocab_size: int, path: str,
                    chunk: int = 1 << 24) -> None:
  """Every id < vocab_size, scanned `chunk` ids at a time (never the whole
  file in memory).

  Raises:
    DatasetError: the first id >= vocab_size, with its offset.
  """
  for lo in range(0, len(tokens), chunk):
    bad = np.flatnonzero(tokens[lo:lo + chunk] >= vocab_size)
    if bad.size:
      i = lo + int(bad[0])
      raise DatasetError(
          f"tokens: {path} holds token id {int(tokens[i])} at offset {i}, not "
          f"below data.vocab_size={vocab_size}; set data.vocab_size to the "
          "tokenizer's vocabulary size (or check data.token_dtype)")


def _tokens(cfg) -> TokenStream:
  """LM on the pre-tokenized data.token_file (`read_token_file`), ids below
  data.vocab_size.

  Raises:
    ValueError: bad data.token_dtype or data.vocab_size.
    DatasetError: see `read_token_file`, `check_token_ids`.
  """
  vocab = int(cfg.vocab_size)
  if not 1 <= vocab < 2 ** 31:
    raise ValueError(f"data.vocab_size={vocab} must be in [1, 2^31): the "
                     "tokenizer's vocabulary size (more than every token id)")
  ids = read_token_file(cfg.token_file, cfg.token_dtype)
  check_token_ids(ids, vocab, cfg.token_file)
  return token_stream("tokens", ids, vocab, cfg,
                      {"source": cfg.token_file, "dtype": cfg.token_dtype})


_LOADERS: dict[str, Callable] = {
    "digits": _digits, "fashion_mnist": _fashion_mnist, "mnist": _mnist,
    "cifar10": _cifar10, "mnist1d": _mnist1d,
    "lowrank_regression": lambda c: lowrank_regression(
        c.seed, validation_size=int(c.validation_size), max_train=int(c.max_train)),
    "teacher_student": lambda c: teacher_student(
        c.seed, validation_size=int(c.validation_size), max_train=int(c.max_train)),
    "chars": lambda c: chars(c, int(c.seq_len) if "seq_len" in c else DEFAULT_SEQ_LEN),
    "text": _text, "tokens": _tokens,
}


def load(data_cfg) -> Dataset:
  """The dataset named by data_cfg.name (fields: see the module docstring).

  Args:
    data_cfg: ConfigDict with name, dir, cache_dir, download, validation_size,
      max_train, classes, seed, text_file (and for the token streams
      seq_len, token_file, token_dtype, vocab_size, holdout_fraction).

  Returns:
    A Dataset.

  Raises:
    ValueError: an unknown name.
    DatasetError: missing files, a bad checksum or a wrong path (the message
      names the apt package, directory or URL to use).
  """
  if data_cfg.name not in _LOADERS:
    raise ValueError(f"unknown dataset data.name={data_cfg.name!r}; valid: "
                     f"{', '.join(NAMES)}")
  return _LOADERS[data_cfg.name](data_cfg)


def default_data_config():
  """The data fields with their defaults (an unlocked ConfigDict)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.name = "digits"
  c.dir = ""
  c.cache_dir = ""
  c.download = False
  c.validation_size = 200
  c.max_train = 0
  c.classes = ()
  c.seed = 0
  c.text_file = ""
  c.seq_len = DEFAULT_SEQ_LEN
  c.token_file = ""
  c.token_dtype = "uint16"
  c.vocab_size = 0
  c.holdout_fraction = 0.02
  return c
