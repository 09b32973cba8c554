"""Token streams for language models: the byte-level tokenizer, the default
corpus, memory-mapped token files, batching by (seed, step), held-out
splits, errors, and the lm eval metrics."""

import math
import os

import numpy as np
import pytest

from lrtrain import data, models, train


def _cfg(name, **kw):
  c = data.default_data_config()
  c.name = name
  for k, v in kw.items():
    c[k] = v
  return c


def _token_file(tmp_path, ids, dtype):
  p = str(tmp_path / f"ids.{dtype}")
  np.asarray(ids, dtype).tofile(p)
  return p


def test_byte_tokenizer_round_trip():
  s = "In the beginning — naïve 😀 ∑\nend"
  t = data.encode_bytes(s)
  assert t.dtype == np.uint8 and len(t) == len(s.encode("utf-8")) > len(s)
  assert data.decode_bytes(t) == s
  assert data.decode_bytes(t.astype(np.int32)) == s      # model-side ids
  # a window cut inside a character decodes, with U+FFFD for the stray bytes
  cut = data.decode_bytes(data.encode_bytes("😀a")[1:])
  assert cut.endswith("a") and "\ufffd" in cut
  with pytest.raises(ValueError, match="must be in"):
    data.decode_bytes([65, 300])


def test_osis_markup_to_text():
  osis = ('<title type="main">Genesis</title> <div sID="p1" type="x-p"/>'
          '<w lemma="strong:H1">In</w> the beginning, God<note placement="foot">'
          '<reference>1:1</reference>a note</note><w lemma="x">created</w> the '
          'heavens<note>n</note>. Tom &amp; Jerry<l level="1" sID="l1"/>  '
          '“Line two”<l eID="l1"/>')
  assert data.osis_to_text(osis) == ("Genesis\nIn the beginning, God created the "
                                     "heavens. Tom & Jerry\n“Line two”\n")


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_windows_are_slices_of_the_memmap(tmp_path, dtype):
  hi = 60_000 if dtype == "uint16" else 2_000_000_000   # ids past 2^16 too
  ids = np.random.default_rng(0).integers(0, hi, 5000)
  p = _token_file(tmp_path, ids, dtype)
  ds = data.load(_cfg("tokens", token_file=p, token_dtype=dtype, vocab_size=hi,
                      seq_len=16, holdout_fraction=0.1))
  assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.dtype(dtype)
  assert ds.task == "lm" and ds.num_classes == hi and ds.input_shape == (16,)
  assert ds.num_examples("train") == 4500 - 16
  b = next(ds.batches("train", 8, seed=0))
  assert b["x"].dtype == np.int32 and b["x"].shape == b["y"].shape == (8, 16)
  np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])
  for x in b["x"]:          # each window is a slice of the file
    s = int(np.flatnonzero(ids == x[0])[0])
    np.testing.assert_array_equal(x, ids[s:s + 16])
  assert ds.meta == {"source": p, "dtype": dtype}


def _offsets_stream(tmp_path, n=4000, **kw):
  """A token file whose id is its offset: a window's first id is its start."""
  p = _token_file(tmp_path, np.arange(n), "uint32")
  return data.load(_cfg("tokens", token_file=p, token_dtype="uint32",
                        vocab_size=n, seq_len=10, **kw))


def test_train_windows_depend_on_seed_and_step_only(tmp_path):
  ds = _offsets_stream(tmp_path)
  first = lambda it, k: [b["x"][:, 0] for b, _ in zip(it, range(k))]
  a = first(ds.batches("train", 6, seed=3), 8)
  b = first(ds.batches("train", 6, seed=3, start_step=5), 3)
  for u, v in zip(a[5:], b):
    np.testing.assert_array_equal(u, v)       # a resume needs only its step
  again = first(_offsets_stream(tmp_path).batches("train", 6, seed=3), 8)
  np.testing.assert_array_equal(np.stack(a), np.stack(again))
  c = first(ds.batches("train", 6, seed=4), 1)[0]
  assert not np.array_equal(a[0], c)
  assert len({tuple(u) for u in a}) == 8      # steps differ


def test_held_out_tail_is_disjoint_from_train(tmp_path):
  n, T = 4000, 10
  ds = _offsets_stream(tmp_path, n=n, holdout_fraction=0.1, validation_size=0)
  val_lo, test_lo = n - 400, n - 200
  starts = np.concatenate([b["x"][:, 0] for b, _ in zip(
      ds.batches("train", 64, seed=0), range(200))])
  assert starts.min() >= 0 and starts.max() + T + 1 <= val_lo   # y too
  assert starts.max() > val_lo - 3 * T                  # the whole range is used
  for split, lo, hi in (("validation", val_lo, test_lo), ("test", test_lo, n)):
    bs = list(ds.batches(split, 7, seed=0))
    x = np.concatenate([b["x"] for b in bs])
    y = np.concatenate([b["y"] for b in bs])
    assert x.min() >= lo and y.max() < hi
    np.testing.assert_array_equal(x[:, 0], lo + T * np.arange(len(x)))
    assert len(x) == (hi - lo - 1) // T == ds.num_examples(split)
  # data.validation_size caps the windows per eval split, evenly spread
  capped = _offsets_stream(tmp_path, n=n, holdout_fraction=0.1, validation_size=5)
  x = np.concatenate([b["x"][:, 0] for b in capped.batches("validation", 4, seed=0)])
  assert len(x) == 5 and x[0] == val_lo and np.all(np.diff(x) >= 3 * T)
  # data.max_train keeps the first offsets
  small = _offsets_stream(tmp_path, n=n, max_train=50)
  assert small.num_examples("train") == 50
  assert next(small.batches("train", 64, seed=0))["x"][:, 0].max() < 50


def test_token_file_errors(tmp_path):
  p = _token_file(tmp_path, [1, 2, 99, 3] * 100, "uint16")
  load = lambda **kw: data.load(_cfg("tokens", **{
      "token_file": p, "vocab_size": 100, "seq_len": 4, "holdout_fraction": 0.2,
      **kw}))
  with pytest.raises(data.DatasetError, match="data.token_file=.*does not exist"):
    load(token_file=str(tmp_path / "none.bin"))
  with pytest.raises(data.DatasetError, match="set data.token_file"):
    load(token_file="")
  with pytest.raises(ValueError, match="unknown data.token_dtype='int8'"):
    load(token_dtype="int8")
  with pytest.raises(data.DatasetError,
                     match="token id 99 at offset 2, not below data.vocab_size=50"):
    load(vocab_size=50)
  with pytest.raises(ValueError, match="data.vocab_size=0 must be"):
    load(vocab_size=0)
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"\x01\x00\x02")
  with pytest.raises(data.DatasetError, match="not a whole number of uint16"):
    load(token_file=str(odd))
  with pytest.raises(data.DatasetError, match="no room for a train"):
    load(seq_len=300)
  with pytest.raises(ValueError, match="data.holdout_fraction=1.0"):
    load(holdout_fraction=1.0)
  assert load().num_classes == 100


def test_text_file_and_missing_default_corpus(tmp_path, monkeypatch):
  p = tmp_path / "t.txt"
  p.write_text("Ünïcode text. " * 300, encoding="utf-8")
  ds = data.load(_cfg("text", text_file=str(p), seq_len=32))
  assert ds.num_classes == 256 and ds.meta["byte_level"]
  np.testing.assert_array_equal(ds.tokens, np.frombuffer(p.read_bytes(), np.uint8))
  with pytest.raises(data.DatasetError, match="data.text_file"):
    data.load(_cfg("text", text_file=str(tmp_path / "none.txt")))
  monkeypatch.setattr(data, "WEB_DIR", str(tmp_path / "no-sword"))
  with pytest.raises(data.DatasetError,
                     match="apt-get install -y sword-text-web"):
    data.load(_cfg("text"))


def test_default_corpus():
  if not os.path.isdir(data.WEB_DIR):
    pytest.skip(f"{data.WEB_PACKAGE} not installed")
  ds = data.load(_cfg("text", seq_len=128))
  assert len(ds.tokens) > 4_000_000 and ds.meta["source"] == data.WEB_DIR
  text = data.decode_bytes(ds.tokens)
  assert "In the beginning, God created the heavens and the earth." in text
  assert "<" not in text and ">" not in text and "&amp;" not in text
  assert ds.num_examples("validation") == ds.num_examples("test") == 200


def test_lm_metrics_from_the_validation_loss(tmp_path):
  assert train.lm_metrics(2.0, byte_level=False) == {"perplexity": math.exp(2.0)}
  m = train.lm_metrics(1.5, byte_level=True)
  assert m["bits_per_byte"] == pytest.approx(1.5 / math.log(2))
  # evaluate(): a byte-level split through a small model
  p = tmp_path / "t.txt"
  p.write_text("abcdefgh" * 400)
  ds = data.load(_cfg("text", text_file=str(p), seq_len=8, validation_size=9))
  mc = models.default_model_config()
  mc.name, mc.factor.kind, mc.d_model, mc.num_layers, mc.mlp_dim = "llama", "dense", 16, 1, 32
  net = models.build(mc, num_classes=256, input_shape=(8,))
  import jax  # pylint: disable=g-import-not-at-top
  params = models.init_params(net, jax.random.PRNGKey(0), (8,))
  ev = train.evaluate(train.make_eval_fn(net, "lm"), params, ds, "validation", 4,
                      train.Sharder())
  assert set(ev) == {"loss", "accuracy", "perplexity", "bits_per_byte"}
  assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-9)
  assert ev["bits_per_byte"] == pytest.approx(ev["loss"] / math.log(2), rel=1e-9)
  assert 3.0 < ev["loss"] < 8.0           # untrained: near log(256) = 5.5
