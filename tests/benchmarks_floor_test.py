"""The width benchmark's two floors: the FLOP count split by the product
shape that prices each part, and the floor at the step's own shapes."""

import pytest

from benchmarks import width


@pytest.mark.parametrize("method", width.METHODS)
@pytest.mark.parametrize("n,r", [(1024, 64), (4096, 256), (256, 200)])
def test_parts_add_up_to_the_count(method, n, r):
  parts = width.step_flops_by_shape(method, n, r)
  assert sum(parts.values()) == width.step_flops(method, n, r)
  assert width.floor_width(method, n, r) in parts


@pytest.mark.parametrize("method", ["dense", "kls", "condlr", "lora", "galore"])
def test_one_shape_methods_have_one_floor(method):
  n, r = 1024, 64
  k = width.floor_width(method, n, r)
  rates = {k: 7e10}
  assert width.floor_shapes_ms(method, n, r, rates) == pytest.approx(
      width.floor_ms(method, n, r, rate=7e10), rel=1e-12)


@pytest.mark.parametrize("method", ["kls_adaptive", "geolora"])
def test_rank_adaptive_pass_priced_at_rank_width(method):
  n, r, b = 4096, 64, width.BATCH
  parts = width.step_flops_by_shape(method, n, r)
  assert set(parts) == {r, 2 * r}
  # The pass: three factored layers forward + backward, and the output layer.
  assert parts[r] == 3 * 3 * 2 * b * (2 * n * r + r * r) + 3 * 2 * b * n * 10
  # At equal rates both floors agree; a slower rate at width r raises only
  # the own-shapes floor, by the pass's share.
  same = width.floor_shapes_ms(method, n, r, {r: 1e11, 2 * r: 1e11})
  assert same == pytest.approx(width.floor_ms(method, n, r, rate=1e11))
  slow = width.floor_shapes_ms(method, n, r, {r: 5e10, 2 * r: 1e11})
  assert slow - same == pytest.approx(parts[r] / 1e11 * 1e3)


def test_probes_timed_beside_each_block_of_steps():
  from benchmarks import common
  import time
  calls = {"step": 0, "probe": 0}

  def step(c):
    calls["step"] += 1
    time.sleep(0.002)
    return c + 1

  def probe():
    calls["probe"] += 1
    time.sleep(0.004)
    return 0

  res = common.time_steps(step, 0, steps=7, repeats=2, warmup=2,
                          beside={"p": probe}, every=5)
  # Blocks of 5 steps, the rest of each repeat closing a shorter one.
  assert len(res["blocks"]) == 4
  assert calls["step"] == 1 + 1 + 14 and res["carry"] == calls["step"]
  assert calls["probe"] == 1 + 3 * 4            # the compiling call, then 3 each
  for step_ms, probe_ms in res["blocks"]:
    assert 2.0 <= step_ms < probe_ms["p"]
