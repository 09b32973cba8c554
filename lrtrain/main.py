"""Train one model from a config file.

  python -m lrtrain.main --config configs/digits.py --workdir runs/digits
  python -m lrtrain.main --config configs/dlrt_lenet5.py:tau=0.1,runlocal \\
      --workdir runs/lenet --config.integrator.r_max=32
  python -m lrtrain.main --config configs/digits.py --show_config

Any config field can be overridden as --config.<path>=value (--show_config
lists the paths, types and values). Rerunning the same command on the same
workdir resumes from the latest checkpoint; Ctrl-C says from which step. A
bad config, missing data, a workdir of another config or a corrupt
checkpoint ends with one `error:` line and exit code 1 (--debug shows the
traceback). The terminal shows progress and the result; the resolved config
goes to <workdir>/config.json; -v 0 (--verbosity=0) brings back the INFO log.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lrtrain import config_utils

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/x.py[:arg]); override any field "
    "with --config.<path>=value (see --show_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print the resolved config's fields (dotted path, "
    "type, value), one per line, and exit; needs no --workdir.")
_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the full traceback of user errors (config, data, "
    "workdir, checkpoint) instead of one error line.")

# absl's default verbosity logs INFO (device lists, orbax's checkpoint
# manager, jax's backend probing); the default here is WARNING, and an
# explicit -v 0 / --verbosity=0 brings INFO back.
QUIET_VERBOSITY = -1


def run(config, workdir: str, *, debug: bool = False) -> int:
  """train_and_evaluate with expected failures as one line; exit code.

  The run is built (config validated, data loaded) before anything is
  printed or written; Ctrl-C ends with the step reached and the checkpoint
  a rerun resumes from (exit code 130). `debug` re-raises instead of the
  one-line messages. Only process 0 prints the run line and the result.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from lrtrain import checkpoint, train, writers  # pylint: disable=g-import-not-at-top
  from lrtrain import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  expected = [config_utils.ConfigError, train.WorkdirError, train.DivergedError,
              checkpoint.CheckpointError, ValueError, FileNotFoundError]
  try:
    train.maybe_initialize_distributed()
    config_utils.validate(config)
    workdir_lib.check(workdir)            # a file, unwritable or in use: now
    built = train.build_run(config)       # data and model; no workdir yet
    logging.info("devices: %s (process %d of %d)", jax.devices(),
                 jax.process_index(), jax.process_count())
    lead = writers.is_writer()
    if lead:
      _say(_run_line(built, workdir, jax.devices()))
    summary = train.train(built, workdir)
  except tuple(expected) as e:
    if debug:
      raise
    _say(f"error: {_one_line(str(e))}")
    return 1
  except train.Interrupted as e:
    if debug:
      raise
    _say(str(e))
    return 130
  except KeyboardInterrupt:
    if debug:
      raise
    _say("interrupted before training started; nothing was saved")
    return 130
  if lead:
    print(result_lines(summary, workdir))
  return 0


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _run_line(built, workdir: str, devices) -> str:
  """What is about to train, on what, where."""
  c = built.config
  kinds = sorted({d.platform for d in devices})
  return (f"training {c.model.name} on {c.data.name} with "
          f"{c.integrator.name} / {c.optimizer.name} for {built.total} steps "
          f"on {len(devices)} {'+'.join(kinds)} device(s); workdir {workdir}")


def result_lines(summary: dict, workdir: str) -> str:
  """The short result summary printed after a run (stdout)."""
  test = []
  if summary.get("test/accuracy") is not None:
    test.append(f"test accuracy {summary['test/accuracy']:.4f}")
  if summary.get("test/loss") is not None:
    test.append(f"loss {summary['test/loss']:.4f}")
  ranks = ", ".join(f"{k.removeprefix('rank/')} {v}"
                    for k, v in summary.get("ranks", {}).items()) or "none"
  steady = summary.get("time/steady_steps_per_sec")
  lines = [
      "result: " + ("  ".join(test) or "no test split"),
      f"compression {summary['params/compression']:.3f} "
      f"({summary['params/eval']:,} of {summary['params/dense']:,} dense "
      f"parameters); ranks: {ranks}",
      f"{summary['steps']} steps in {summary['time/wall_s']:.1f} s"
      + (f" ({steady:.1f} steps/s steady)" if steady else ""),
      f"outputs in {workdir}: summary.json, metrics.jsonl, config.json, "
      f"plots/, checkpoints/",
  ]
  return "\n".join(lines)


def config_lines(config) -> list[str]:
  """'path  type  value' for every field of a config, aligned."""
  rows = []

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if hasattr(value, "items"):
        walk(value, path + ".")
      else:
        rows.append((path, type(value).__name__, repr(value)))
  walk(config, "")
  w0 = max(len(r[0]) for r in rows)
  w1 = max(len(r[1]) for r in rows)
  return [f"{p:<{w0}}  {t:<{w1}}  {v}" for p, t, v in rows]


class _PlainFormatter(py_logging.Formatter):
  """`warning: message` (the level in lower case, nothing else)."""

  def format(self, record):
    return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv):
  if flags.FLAGS.verbosity == QUIET_VERBOSITY:
    # Warnings as plain "warning: ..." lines (absl's prefix carries the
    # date, thread id and source line, which say nothing to a user).
    logging.get_absl_handler().setFormatter(_PlainFormatter())
  if len(argv) > 1:
    return _usage_error(f"unexpected arguments {' '.join(argv[1:])}; "
                        "config fields are set as --config.<path>=value")
  if _CONFIG.value is None:
    return _usage_error("--config is required, e.g. --config "
                        "configs/digits.py (a config file)")
  if _SHOW_CONFIG.value:
    try:
      print("\n".join(config_lines(_CONFIG.value)), flush=True)
    except BrokenPipeError:     # `| head`: the reader has what it wanted
      sys.stdout = open(os.devnull, "w")
    return 0
  if not _WORKDIR.value:
    return _usage_error("--workdir is required (the run directory; a rerun "
                        "resumes there)")
  return run(_CONFIG.value, _WORKDIR.value, debug=_DEBUG.value)


def _usage_error(message: str) -> int:
  _say(f"error: {message}")
  return 2


# --------------------------------------------------------------------------
# Flag parsing: the config file is loaded (and its overrides applied) while
# absl parses the flags, so its errors are turned into one line here.
# --------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file errors as one `error:` line.

  Exits with code 1 on such an error (re-raised with --debug).
  """
  early = flags.FlagValues()   # --config and --debug alone, before loading
  flags.DEFINE_string("config", None, "", flag_values=early)
  flags.DEFINE_bool("debug", False, "", flag_values=early)
  try:
    early(argv, known_only=True)
  except flags.Error:
    pass                        # the full parse below reports it
  spec = early["config"].value
  path = spec.split(":", 1)[0] if spec else None
  try:
    if path and not os.path.isfile(path):
      raise config_utils.ConfigError(
          f"config file {path} does not exist; pass --config "
          "configs/<name>.py[:arg] (a path relative to the current directory)")
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if early["debug"].value:
      raise
    _say(f"error: {_one_line(flag_error(e, spec))}")
    sys.exit(1)
  if flags.FLAGS["verbosity"].using_default_value:
    # Set (not defaulted): absl's app.run raises a defaulted verbosity to INFO.
    flags.FLAGS.verbosity = QUIET_VERBOSITY
  return rest


def flag_error(e: BaseException, spec: str | None) -> str:
  """The one-line message of an error raised while parsing the flags
  (loading the config file `spec` = path[:arg] included)."""
  path = spec.split(":", 1)[0] if spec else None
  chain = []
  while e is not None and e not in chain:
    chain.append(e)
    e = e.__cause__ or e.__context__
  if isinstance(chain[0], (AttributeError, KeyError)):
    # An override's unknown field (AttributeError), or an unknown group
    # (a bare KeyError, told from get_config's own by the override naming it).
    for x in chain:
      if isinstance(x, KeyError) and (isinstance(chain[0], AttributeError)
                                      or _override_naming(x)):
        return _unknown_field(x)
  ours = [x for x in chain if isinstance(x, config_utils.ConfigError)]
  if ours:            # the innermost is get_config's own, without traceback
    text = str(ours[-1])
    return text if path and path in text else f"{spec}: {text}"
  for x in chain:
    if isinstance(x, SyntaxError):
      return config_utils.load_failure(path, x)
  first, root = chain[0], chain[-1]
  lines = [l for l in str(first).splitlines() if l.strip()]
  if "Traceback (most recent call last):" in str(first):
    # ml_collections quotes get_config's traceback in its message; the
    # last line is "module.ErrorType: message".
    kind, _, message = lines[-1].partition(": ")
    kind = kind.rsplit(".", 1)[-1]
    if kind == "ConfigError":
      return f"{spec}: {message}"
    return (f"config file {path}: get_config failed with {kind}: {message} "
            "(--debug shows the traceback)")
  if isinstance(first, flags.Error):
    return lines[0] if lines else str(first)
  return config_utils.load_failure(path, root)


def _missing_key(e: KeyError) -> tuple[str, str]:
  """(key, hint) of ml_collections' KeyError (it may add a "Did you mean"
  line)."""
  text = str(e.args[0]) if e.args else str(e)
  key, _, hint = text.partition("\n")
  return key.strip("'\""), hint.strip()


def _override_naming(e: KeyError) -> str | None:
  """The --config.<path> flag on the command line whose path has the
  missing key, if any."""
  key = _missing_key(e)[0]
  flags_given = [a.split("=", 1)[0] for a in sys.argv[1:]
                 if a.startswith("--config.")]
  named = [f for f in flags_given if key in f[len("--config."):].split(".")]
  return named[0] if named else None


def _unknown_field(e: KeyError) -> str:
  """The --config.<path> override that named a field the config lacks."""
  key, hint = _missing_key(e)
  where = _override_naming(e) or "a --config.<field> override"
  hint = hint or "--show_config lists the fields."
  return f"{where}: the config has no field {key!r}. {hint}"


def entry():
  """Console entry point: quiet logging default, one-line config errors."""
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
