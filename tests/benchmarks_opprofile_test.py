"""The per-op profile's attribution of XLA operations to source lines."""

import inspect
import re
import zlib

import jax
import jax.numpy as jnp

from benchmarks import opprofile
from lrtrain.integrators import linalg


def _outer(x):
  def inner(y):
    return jnp.sin(y) @ y           # the product traced here
  return inner(x) * 2.0


def _line_of(fn, text: str) -> int:
  lines, start = inspect.getsourcelines(fn)
  return start + next(i for i, l in enumerate(lines) if text in l)


# The persistent compilation cache's key leaves out the tracing stacks: a
# cached program would carry the line numbers of an earlier version of this
# file. A checksum of the file as an output keeps each version's programs
# apart.
_VERSION = zlib.crc32(open(__file__, "rb").read()) & 0x7FFFFFFF


def _compiled_text(fn, *args) -> str:
  return jax.jit(lambda *a: (fn(*a), jnp.int32(_VERSION))).lower(
      *args).compile().as_text()


def test_operations_map_to_the_innermost_frame_under_the_root():
  hlo = _compiled_text(_outer, jnp.ones((8, 8)))
  sources = opprofile.instruction_sources(hlo, root="tests/")
  want = (f"tests/benchmarks_opprofile_test.py:_outer.inner:"
          f"{_line_of(_outer, '@ y')}")
  assert want in set(sources.values()), sorted(set(sources.values()))
  # Every attributed operation names this file, none a frame outside it.
  assert all(v.startswith("tests/benchmarks_opprofile_test.py:")
             for v in sources.values())


def test_factorizations_are_named_by_their_caller_not_the_lapack_wrapper():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  hlo = _compiled_text(lambda x: linalg.orth(x, 8), x)
  lapack_ops = re.findall(
      r"^\s*(?:ROOT )?%([\w.\-]+) = .*custom_call_target=\"[^\"]*potrf",
      hlo, re.M)
  assert lapack_ops, "the Cholesky route did not trace a potrf call"
  sources = opprofile.instruction_sources(hlo)
  for op in lapack_ops:
    assert sources[op].startswith("lrtrain/integrators/linalg.py:"), sources[op]
  unskipped = opprofile.instruction_sources(hlo, skip=())
  assert any(unskipped[op].startswith("lrtrain/lapack.py:") for op in lapack_ops)


def test_text_without_stack_tables_attributes_nothing():
  assert opprofile.instruction_sources("HloModule m\n\nENTRY e {\n}\n") == {}
