"""README.md and every docs/*.md page: their python examples run as written,
their links resolve inside the repository, and README stays a front door.

Each page's ```python blocks run in order in one namespace (one test per
page). Examples that cannot run in a test (a model download, a long run) are
fenced as ```text or ```bash instead.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 320

_PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """The page's ```python blocks as (first line number, code)."""
  text = path.read_text(encoding="utf-8")
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
          for m in _PYTHON_BLOCK.finditer(text)]


def _run(path: pathlib.Path, line: int, code: str, ns: dict) -> None:
  # Padding keeps tracebacks on the page's own line numbers.
  exec(compile("\n" * (line - 1) + code, _rel(path), "exec"), ns)  # noqa: S102


def _prose(path: pathlib.Path, *, inline_code: bool = False) -> str:
  """The page without fenced blocks (and without inline code unless asked)."""
  text = _FENCE.sub("", path.read_text(encoding="utf-8"))
  return text if inline_code else _INLINE_CODE.sub("", text)


def _anchor(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
  text = re.sub(r"[`*_]{2,}|`", "", heading).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_python_examples_run(page, capsys):
  blocks = python_blocks(page)
  if page == README:
    assert blocks, "README has no python example"
  ns: dict = {"__name__": f"doc_{page.stem}"}
  for i, (line, code) in enumerate(blocks):
    _run(page, line, code, ns)
    if page == README and i == 0:
      # The quickstart: the stock model runs on quantized params, which are
      # less than a fifth of the float bytes.
      assert ns["logits"].shape == (8, 10)
      out = capsys.readouterr().out
      before, after = (int(v) for v in re.findall(r"(\d+)", out)[:2])
      assert after < 0.2 * before


def test_readme_is_short():
  lines = README.read_text(encoding="utf-8").count("\n")
  assert lines <= README_MAX_LINES, (
      f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into a docs/ page")


def test_readme_keeps_the_two_commands():
  text = README.read_text(encoding="utf-8")
  assert re.search(r"```bash\nmake run\b.*\nmake test\b.*\n```", text), (
      "README must open with the fenced `make run` / `make test` block")


def test_pages_stay_inside_the_repository():
  bad = []
  for page in PAGES:
    text = page.read_text(encoding="utf-8")
    for needle in ("../shared", "DESIGN.md"):
      if needle in text:
        bad.append(f"{_rel(page)} mentions {needle!r} (the design is docs/design.md)")
  assert not bad, "\n".join(bad)


def test_relative_links_resolve():
  anchors = {p: {_anchor(h) for h in _HEADING.findall(_prose(p, inline_code=True))}
             for p in PAGES}
  bad = []
  for page in PAGES:
    for target in _LINK.findall(_prose(page)):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
        continue
      where = f"{_rel(page)}: link {target!r}"
      path, _, anchor = target.partition("#")
      if path.startswith("/"):
        bad.append(f"{where} is absolute")
        continue
      dest = (page.parent / path).resolve() if path else page
      if not dest.is_relative_to(ROOT):
        bad.append(f"{where} points outside the repository")
      elif not dest.exists():
        bad.append(f"{where} points to a file that does not exist")
      elif anchor and dest in anchors and anchor not in anchors[dest]:
        bad.append(f"{where}: {_rel(dest)} has no heading with anchor #{anchor}")
  assert not bad, "\n".join(bad)
