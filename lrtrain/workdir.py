"""A run's workdir: the early check, the lock, and who may reuse it.

Order in a run (train.py): `check(workdir)` before data and model are built
(a path that is a file or not writable ends at once, naming the path);
then, per workdir, `Lock.acquire()` before anything in it is read or
written, `prepare_workdir` (refuse another config's run, or clear it under
config.overwrite), the run, and `Lock.release()` when the run's workdir is
closed (on errors too).

The lock is an OS lock (`fcntl.flock`) on `<workdir>/.lock`, held by an
open file for the run's lifetime; the file holds `pid host start-time` of
the holder, for the refusal message of a second run on the same workdir.
The OS drops the lock when its process ends however it ends, so a `.lock`
file left by a killed run holds nothing and never blocks a rerun; the file
itself stays (removing it would let two runs lock two different files).
In a multi-host run only process 0 takes it. `.lock` is not one of the run
files: `prepare_workdir` neither reads it nor clears it.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket

import ml_collections
from absl import logging

from lrtrain import writers

LOCK_FILE = ".lock"
# What a run writes; config.overwrite clears these (never the lock).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints",
             "plots", "tensorboard")
# Fields that change what a run computes; a workdir holding a run whose
# fingerprint differs is refused (num_steps may grow: that is a resume).
FINGERPRINT_SECTIONS = ("seed", "data", "model", "integrator", "optimizer")


class WorkdirError(RuntimeError):
  """A workdir this run cannot use: not writable, in use by another run,
  or holding a run of a different config."""


def check(workdir: str) -> None:
  """Refuse, before anything is built, a workdir that cannot be used: a
  path that exists and is no directory, one that is not writable (the
  directory itself, or where it does not exist yet the nearest existing
  parent it would be created in), or one whose lock another run holds now
  (`Lock.acquire` decides for good later). Creates nothing.

  Raises:
    WorkdirError: naming the path and what to do.
  """
  Lock(workdir).probe()
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir} is a file, not a directory; "
                       "pass a directory path to --workdir")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise WorkdirError(f"workdir {workdir} cannot be created: {existing} is "
                       "a file; pass a path under a directory to --workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = ("is not writable" if existing == path else
            f"cannot be created ({existing} is not writable)")
    raise WorkdirError(f"workdir {workdir} {what}; fix its permissions or "
                       "use another workdir")


class Lock:
  """The exclusive lock of one workdir for one run's lifetime (module
  docstring). `acquire` creates the workdir if needed."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "Lock":
    """Take the lock (only process 0 of a multi-host run does).

    Raises:
      WorkdirError: another live process holds it (naming its pid, host
        and start time) or the workdir cannot be created.
    """
    if not writers.is_writer():
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise WorkdirError(f"workdir {self.workdir} cannot be used "
                         f"({e.strerror}); fix its permissions or use another "
                         "workdir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      err = (self._in_use(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
             else WorkdirError(f"workdir {self.workdir} cannot be locked "
                               f"({e.strerror}); use another workdir"))
      os.close(fd)
      raise err from None
    os.ftruncate(fd, 0)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {stamp}\n".encode(), 0)
    self._fd = fd
    return self

  def probe(self) -> None:
    """Raise if another process holds the lock now; takes nothing, creates
    nothing (a shared lock, dropped at once, fails only against a holder).

    Raises:
      WorkdirError: as `acquire`.
    """
    if not writers.is_writer():
      return              # the other processes of a run: process 0's lock
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except OSError:
      return              # no lock file (or no workdir): nobody holds it
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      raise self._in_use(fd) from None
    finally:
      os.close(fd)

  def _in_use(self, fd: int) -> WorkdirError:
    holder = os.pread(fd, 512, 0).decode("utf-8", "replace")
    return WorkdirError(f"workdir {self.workdir} is in use by "
                        f"{_describe(holder)}; wait for it to finish or use "
                        "another workdir")

  def release(self) -> None:
    """Drop the lock (the file stays); a no-op when not held."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _describe(holder: str) -> str:
  """'pid P on host H (since T)' from a lock file's `pid host start-time`
  (the time without its date when it is today)."""
  parts = holder.split()
  if len(parts) != 3:
    return "another process"
  pid, host, stamp = parts
  try:
    t = datetime.datetime.fromisoformat(stamp)
    since = (t.strftime("%H:%M:%S") if t.date() == datetime.date.today()
             else t.strftime("%Y-%m-%d %H:%M:%S"))
  except ValueError:
    since = stamp
  return f"pid {pid} on host {host} (since {since})"


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """JSON of the config sections that determine the trajectory."""
  d = config.to_dict()
  fp = {k: d[k] for k in FINGERPRINT_SECTIONS}
  fp["batch_size"] = d["train"]["batch_size"]
  return json.dumps(fp, sort_keys=True, default=str)


def prepare_workdir(config, workdir: str) -> None:
  """Refuse a workdir of another config; clear its run files under
  config.overwrite (the lock stays). Call it with the workdir's lock held.

  Raises:
    WorkdirError: a config.json with another fingerprint and no overwrite.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    try:
      with open(path) as fh:
        old = ml_collections.ConfigDict(json.load(fh))
      same = fingerprint(old) == fingerprint(config)
    except (json.JSONDecodeError, KeyError, TypeError):
      same = False
    if not same:
      if not config.overwrite:
        raise WorkdirError(f"workdir {workdir} holds a run of a different "
                           "config; use another workdir or set "
                           "--config.overwrite=True to replace it")
      logging.warning("overwriting the run in %s", workdir)
      for name in RUN_FILES if writers.is_writer() else ():
        p = os.path.join(workdir, name)
        if os.path.isdir(p):
          shutil.rmtree(p)
        elif os.path.exists(p):
          os.remove(p)
  os.makedirs(workdir, exist_ok=True)
