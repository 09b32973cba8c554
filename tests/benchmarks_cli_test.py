"""The benchmark runner's flags: section names it cannot run end in one
line naming the flag, before anything is timed or written."""

import pytest

from benchmarks import run


@pytest.mark.parametrize("argv,message", [
    (["--sections", "widht"], "unknown section(s) widht"),
    (["--sections", "lenet_critical_path"], "runs only with --quick"),
])
def test_sections_it_cannot_run_are_refused(argv, message, tmp_path):
  out = tmp_path / "res.json"
  with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(
      ")", r"\)")):
    run.main(argv + ["--out", str(out)])
  assert not out.exists()
