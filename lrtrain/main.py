"""Train one model from a config file.

  python -m lrtrain.main --config configs/digits.py --workdir runs/digits
  python -m lrtrain.main --config configs/dlrt_lenet5.py:tau=0.1,runlocal \\
      --workdir runs/lenet --config.integrator.r_max=32

Rerunning the same command on the same workdir resumes from the latest
checkpoint. A bad config, missing data, a workdir of another config or a
corrupt checkpoint ends with one error line and exit code 1.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/x.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str) -> int:
  """train_and_evaluate with expected failures as one line; exit code."""
  import jax  # pylint: disable=g-import-not-at-top
  from lrtrain import checkpoint, config_utils, train  # pylint: disable=g-import-not-at-top
  expected = [config_utils.ConfigError, train.WorkdirError, train.DivergedError,
              checkpoint.CheckpointError, ValueError, FileNotFoundError]
  train.maybe_initialize_distributed()
  logging.info("devices: %s (process %d of %d)", jax.devices(),
               jax.process_index(), jax.process_count())
  logging.info("config:\n%s", config)
  try:
    summary = train.train_and_evaluate(config, workdir)
  except tuple(expected) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.info("test accuracy %s, compression %.3f, wall %.1fs",
               summary["test/accuracy"], summary["params/compression"],
               summary["time/wall_s"])
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sys.exit(run(_CONFIG.value, _WORKDIR.value))


def entry():
  """Console entry point; config-flag errors also end in one line."""
  try:
    app.run(main)
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    # ml_collections reports an unknown field of an override as a KeyError
    # (wrapped in an AttributeError by the flag parser).
    missing = e if isinstance(e, KeyError) else (
        e.args[0] if e.args and isinstance(e.args[0], KeyError) else None)
    print(f"error: {_unknown_field(missing) if missing else e}", file=sys.stderr)
    sys.exit(1)


def _unknown_field(e: KeyError) -> str:
  """The --config.<path> override that named a field the config lacks."""
  text = str(e.args[0]) if e.args else str(e)
  key, _, hint = text.partition("\n")       # ml_collections may add a
  key = key.strip("'\"")                      # "Did you mean" line
  flags_given = [a.split("=", 1)[0] for a in sys.argv[1:]
                 if a.startswith("--config.")]
  named = [f for f in flags_given if key in f[len("--config."):].split(".")]
  where = named[0] if named else "a --config.<field> override"
  hint = hint.strip() or "Check the spelling against the config file."
  return f"{where}: the config has no field {key!r}. {hint}"


if __name__ == "__main__":
  entry()
