"""The README's example runs as written."""

import pathlib
import re


def test_readme_python_example_runs(capsys):
  text = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  ns: dict = {}
  exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102
  assert ns["logits"].shape == (8, 10)
  out = capsys.readouterr().out
  before, after = (int(v) for v in re.findall(r"(\d+)", out)[:2])
  assert after < 0.2 * before
