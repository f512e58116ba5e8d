"""Loads GGUF files with llama.cpp (llama-cpp-python) and says which it accepts.

Run as a subprocess (a damaged file can abort llama.cpp): reads one request per
line on stdin, `<0|1 check_tensors> <path>`, and answers one JSON line per
file on stdout: `RESULT {"ok": bool, "log": [last error lines]}` (other lines
may appear: llama.cpp prints there when it aborts).
"""

import ctypes
import json
import sys


def main() -> None:
  import llama_cpp

  lines: list[str] = []

  @llama_cpp.llama_log_callback
  def _log(level, text, user_data):  # noqa: ARG001
    msg = text.decode("utf-8", errors="replace").strip()
    if msg and level >= 3:  # warnings and errors
      lines.append(msg)

  llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
  llama_cpp.llama_backend_init()
  out = sys.stdout
  for req in sys.stdin:
    req = req.rstrip("\n")
    if not req:
      continue
    check, path = req.split(" ", 1)
    lines.clear()
    params = llama_cpp.llama_model_default_params()
    params.check_tensors = check == "1"
    params.use_mmap = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    ok = bool(model)
    if ok:
      llama_cpp.llama_model_free(model)
    out.write("RESULT " + json.dumps({"ok": ok, "log": lines[-4:]}) + "\n")
    out.flush()


if __name__ == "__main__":
  main()
