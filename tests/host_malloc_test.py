"""`import lrtrain` keeps glibc's arenas from giving pages back between steps
(lrtrain/__init__.py): set before jax's CPU threads start, never where the
process chose its own malloc settings or opted out, never too late."""

import os
import subprocess
import sys

import pytest

_GLIBC = sys.platform.startswith("linux") and bool(
    os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else "")

_REPORT = "import lrtrain; print(lrtrain.MALLOC_SET)"


def _run(code: str, **env) -> list[str]:
  """stdout words of `code` in a process without malloc variables of its
  own (those of this process, if any, would make lrtrain step aside)."""
  base = {k: v for k, v in os.environ.items()
          if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES",
                                                   "LRTRAIN_MALLOC"))}
  r = subprocess.run([sys.executable, "-c", code], env=dict(base, **env),
                     capture_output=True, text=True, check=True)
  return r.stdout.split()


def _set(code: str = _REPORT, **env) -> bool:
  return {"True": True, "False": False}[_run(code, **env)[-1]]


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt only")
def test_set_on_import_before_jax_computes():
  assert _set()
  # Importing jax first is fine: its CPU client starts at the first
  # computation, and lrtrain's import computes nothing.
  assert _set("import jax, lrtrain; from jax._src import xla_bridge as xb; "
              "assert not xb.backends_are_initialized(); "
              "print(lrtrain.MALLOC_SET)")


def test_left_alone_when_chosen_or_too_late():
  assert not _set(LRTRAIN_MALLOC="0")
  assert not _set(MALLOC_TOP_PAD_="131072")
  assert not _set(MALLOC_ARENA_MAX="2")
  assert not _set(GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
  # After the first computation the arenas exist: the pad would not reach
  # them, and the import changes nothing.
  assert not _set("import jax.numpy as jnp; jnp.zeros(2).block_until_ready(); "
                  "import lrtrain; print(lrtrain.MALLOC_SET)")


def test_a_step_runs_the_same_either_way():
  """The allocator settings change where memory comes from, not results: a
  GeoLoRA step's new params are bitwise equal with and without them."""
  code = """
import jax, jax.numpy as jnp, numpy as np, optax, lrtrain
from lrtrain import integrators
from lrtrain.factorizations import lowrank
key = jax.random.PRNGKey(0)
W = lowrank.init(key, 64, 48, rank=6, capacity=16)
p = {"w": W}
integ = integrators.build("geolora", optax.adam(1e-2), tau=0.1)
s = integ.init(p)
x = jax.random.normal(key, (32, 48))
loss = lambda q, b: (jnp.sum((lowrank.apply(q["w"], b) - 1.0) ** 2), {})
for _ in range(3):
  p, s, _ = jax.jit(lambda p, s: integ.step(loss, p, s, x))(p, s)
print(float(np.asarray(p["w"].S).sum()).hex(), int(p["w"].rank), lrtrain.MALLOC_SET)
"""
  on, off = _run(code), _run(code, LRTRAIN_MALLOC="0")
  assert on[:2] == off[:2]
  assert on[2] == str(_GLIBC) and off[2] == "False"
