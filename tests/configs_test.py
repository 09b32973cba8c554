"""Every config file: every sweep point builds under the lock, and a
runlocal variant trains end to end for a few steps in a temp workdir."""

import glob
import json
import os

import pytest

from lrtrain import config_utils, data, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py"))
REQUIRED = ("digits", "dlrt_lenet5", "dlrt_mlp", "geolora_mlp", "condlr_lenet5",
            "tdlrt_vgg", "lora_transformer", "llama_lm")
SLOW_CONFIGS = ("tdlrt_vgg", "dlrt_lenet5", "condlr_lenet5", "methods_fashion",
                "llama_lm", "lora_transformer")


def path(name):
  return os.path.join(ROOT, "configs", f"{name}.py")


def test_required_configs_exist():
  assert set(REQUIRED) <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_every_sweep_point_builds_locked(name, arg):
  points = sweep.expand(path(name) + arg)
  assert points
  for run_name, c, overrides in points:
    assert c.is_locked
    config_utils.validate(c)
    for key, value in overrides.items():
      node = c
      for part in key.split("."):
        node = node[part]
      assert node == (tuple(value) if isinstance(value, list) else value), key
    with pytest.raises(AttributeError):
      c.not_a_field = 1                # locked: no new knobs


# The convolutional and transformer configs compile the heaviest programs
# (10-30 s cold): second tier.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.tier2) if n in SLOW_CONFIGS else n
    for n in CONFIGS])
def test_runlocal_end_to_end(name, tmp_path, tmp_path_factory, fashion_mnist_dir):
  c = sweep.load_config_module(path(name)).get_config("runlocal")
  assert c.runlocal and c.train.num_steps <= 3
  if c.data.name == "fashion_mnist" and fashion_mnist_dir:
    # Without the Debian package: generated 28x28 IDX files, read by the
    # same loader into the same model shapes.
    c.data.dir = fashion_mnist_dir
  if c.data.name == "text" and not (c.data.text_file or os.path.isdir(data.WEB_DIR)):
    # Without the Debian package (sword-text-web): a generated text.
    corpus = tmp_path_factory.mktemp("text") / "corpus.txt"
    corpus.write_text("In the beginning was a small corpus. " * 2000)
    c.data.text_file = str(corpus)
  s = train.train_and_evaluate(c, str(tmp_path))
  assert s["steps"] == c.train.num_steps
  with open(tmp_path / "metrics.jsonl") as fh:
    rows = [json.loads(l) for l in fh]
  assert any("train/loss" in r for r in rows)
  assert any("eval/loss" in r for r in rows)
  assert os.path.exists(tmp_path / "summary.json")
  assert os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_methods_fashion_every_point_builds_its_model(arg):
  """Every (model, method) point traces its init on 28x28x1 inputs: ranks
  and Tucker ranks fit every layer (LeNet5's conv1 has one input channel)."""
  from lrtrain import models
  points = sweep.expand(path("methods_fashion") + arg)
  assert len(points) == 20
  for run_name, c, _ in points:
    models.build(c.model, num_classes=10, input_shape=(28, 28, 1))
