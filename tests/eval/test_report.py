import json
import os

import pytest

from quantjax.eval import report

PNG = b"\x89PNG\r\n\x1a\n"


def _rec(method, ppl, mb, **kw):
  return dict({"method": method, "perplexity": ppl, "params_bytes": int(mb * 1e6),
               "params_mb": mb, "model": "m", "corpus_sha256": "abc", "eval_tokens": 512,
               "window": 128}, **kw)


@pytest.mark.parametrize("record, family", [
    ({"method": "fp32"}, "fp32"),
    ({"method": "cast_bf16"}, "cast"),
    ({"method": "rtn_int4_g64"}, "rtn"),
    ({"method": "gptq int4_g64", "stages": ["gptq int4_g64"]}, "gptq"),
    ({"method": "awq int4_g64"}, "awq"),
    ({"method": "qat-lsq int4_g64", "stages": ["qat-lsq int4_g64"]}, "qat"),
    ({"method": "wanda 0.5", "stages": ["wanda 0.5"]}, "prune"),
    ({"method": "sparsegpt 2:4 → distill 60 steps"}, "prune+distill"),
    ({"method": "sparsegpt 2:4 → distill 60 steps → rtn int4_g64",
      "stages": ["sparsegpt 2:4", "distill 60 steps", "rtn int4_g64"]}, "prune+distill+rtn"),
    ({"method": "pdq/magnitude 2:4", "run": "pdq"}, "prune"),
    ({"method": "anything", "family": "mixed"}, "mixed"),
])
def test_method_family(record, family):
  assert report.method_family(record) == family


def test_pareto_plot_draws_one_marker_per_family(tmp_path):
  records = [_rec("fp32", 11.0, 538), _rec("rtn_int4_g64", 16.0, 173),
             _rec("rtn_int8", 11.1, 270), _rec("gptq int4_g64", 14.2, 173),
             _rec("awq int4_g64", 13.5, 173), _rec("qat-lsq int4_g64", 13.0, 173),
             _rec("sparsegpt 2:4 → distill 60 steps → rtn int4_g64", 27.0, 173),
             _rec("ternary_tw", 90.0, 60), _rec("nf4_g64", 12.9, 173)]
  styles = report.pareto_plot(records, tmp_path / "p.png", title="t")
  assert list(styles) == sorted(styles)
  assert set(styles) == {"fp32", "rtn", "gptq", "awq", "qat", "prune+distill+rtn", "ternary",
                         "nf4"}
  markers = [m for m, _ in styles.values()]
  assert len(set(markers)) == len(markers)  # distinct markers, two rtn records share one
  assert styles["fp32"] == report.FAMILY_STYLES["fp32"]
  assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_family_styles_refuses_too_many_families():
  many = [f"f{i}" for i in range(len(report.FAMILY_STYLES) + 20)]
  with pytest.raises(ValueError, match="method families"):
    report.family_styles(many)


def test_markdown_table_escapes_pipes_in_cells():
  md = report.markdown_table([_rec("rtn int4", 12.0, 173, quantized=r"layers/(attn|mlp)/kernel")])
  row = md.splitlines()[2]
  assert r"(attn\|mlp)" in row
  assert len(row.replace(r"\|", "").split("|")) == len(md.splitlines()[0].split("|"))


def test_loss_curves_plot(tmp_path):
  curves = [{"label": "a", "history": [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]},
            {"label": "empty", "history": []},
            {"label": "b", "history": [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]}]
  assert report.loss_curves_plot(curves, tmp_path / "loss.png") == 2
  assert (tmp_path / "loss.png").read_bytes()[:8] == PNG


def _write_stage(d, name, stage, label, history):
  os.makedirs(d / name)
  info = {"steps": len(history), "tokens": 1024 * len(history), "seconds": 3.0,
          "history": history}
  (d / name / "done.json").write_text(json.dumps(
      {"key": "k", "stage": stage, "label": label, "info": info}))


def test_compare_merges_sweeps_fills_deltas_and_draws_loss_curves(tmp_path):
  from experiments import compare
  base = tmp_path / "default"
  report.write_json_atomic(base / "results.json", {"records": [
      _rec("fp32", 10.0, 538, delta_pct=0.0), _rec("rtn_int4_g64", 15.0, 173, delta_pct=50.0)]})
  # A sweep work directory: one sub-directory per entry, FP32 evaluated once more.
  sweep = tmp_path / "qat"
  report.write_json_atomic(sweep / "fp32" / "results.json",
                           {"records": [_rec("fp32", 10.0, 538, delta_pct=0.0)]})
  report.write_json_atomic(sweep / "qat_lsq" / "results.json", {"records": [
      _rec("qat-lsq int4_g64", 12.0, 173, stages=["qat-lsq int4_g64"], delta_pct=None)]})
  hist = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in range(1, 6)]
  _write_stage(sweep / "qat_lsq", "00_qat", "qat", "qat-lsq int4_g64", hist)
  _write_stage(sweep / "qat_lsq", "01_evaluate", "evaluate", "x", [])
  out = tmp_path / "cmp"

  res = compare.compare([str(base), str(sweep)], str(out))
  methods = [r["method"] for r in res["records"]]
  assert methods == ["default/fp32", "default/rtn_int4_g64", "qat/qat-lsq int4_g64"]
  assert res["records"][-1]["run"] == "qat/qat_lsq"
  qat = res["records"][-1]
  assert qat["family"] == "qat" and qat["delta_pct"] == pytest.approx(20.0)
  assert set(res["families"]) == {"fp32", "rtn", "qat"}
  assert res["curves_drawn"] == 1
  assert res["curves"][0]["label"] == "qat/qat_lsq: qat-lsq int4_g64"
  md = (out / "compare.md").read_text()
  assert "| qat |" in md and "+20.00%" in md and "| 5 | 5120 |" in md
  for f in ("pareto.png", "loss_curves.png"):
    assert (out / f).read_bytes()[:8] == PNG
  saved = json.loads((out / "compare.json").read_text())
  assert len(saved["records"]) == 3 and len(saved["loss_curves"]) == 1

  # Two entries of one sweep with the same method label keep their entry names.
  report.write_json_atomic(sweep / "qat_lsq2" / "results.json", {"records": [
      _rec("qat-lsq int4_g64", 12.5, 173, stages=["qat-lsq int4_g64"])]})
  methods = [r["method"] for r in compare.merge([str(base), str(sweep)])]
  assert methods[-2:] == ["qat/qat_lsq/qat-lsq int4_g64", "qat/qat_lsq2/qat-lsq int4_g64"]

  with pytest.raises(FileNotFoundError, match="no results.json"):
    compare.compare([str(tmp_path / "cmp")], str(tmp_path / "cmp2"))


def test_compare_by_text_puts_each_text_beside_the_others(tmp_path):
  from experiments import compare
  a, b, c = tmp_path / "pydoc", tmp_path / "kjv", tmp_path / "kjv_x"
  report.write_json_atomic(a / "results.json", {"records": [
      _rec("fp32", 10.0, 538, entry="fp32", corpus="pydoc_topics"),
      _rec("gptq int4_g64", 11.0, 173, entry="gptq", corpus="pydoc_topics", kl_mean=0.1)]})
  report.write_json_atomic(b / "results.json", {"records": [
      _rec("fp32", 4.0, 538, entry="fp32", corpus="kjv", corpus_sha256="x"),
      _rec("gptq int4_g64", 5.0, 173, entry="gptq", corpus="kjv", corpus_sha256="x"),
      _rec("gptq int4_g64", 5.2, 173, entry="gptq", corpus="kjv", runtime="llama.cpp")]})
  report.write_json_atomic(c / "results.json", {"records": [
      _rec("fp32", 4.0, 538, entry="fp32", corpus="kjv", calib_corpus="pydoc_topics"),
      _rec("gptq int4_g64", 6.0, 173, entry="gptq", corpus="kjv", calib_corpus="pydoc_topics")]})
  res = compare.by_text([str(a), str(b), str(c)], str(tmp_path / "out"))
  assert res["columns"] == ["pydoc: pydoc_topics", "kjv: kjv",
                            "kjv_x: kjv, calibrated on pydoc_topics"]
  gptq = res["rows"][1]
  assert gptq["pydoc: pydoc_topics"]["delta_pct"] == pytest.approx(10.0)
  assert gptq["kjv: kjv"]["delta_pct"] == pytest.approx(25.0)
  assert gptq["kjv_x: kjv, calibrated on pydoc_topics"]["delta_pct"] == pytest.approx(50.0)
  md = (tmp_path / "out" / "texts.md").read_text()
  assert "| gptq | jax | 11.000 | +10.00% | 0.1 | 5.000 | +25.00% |" in md
  assert "| gptq | llama.cpp | – | – | – | 5.200 | +30.00% |" in md
