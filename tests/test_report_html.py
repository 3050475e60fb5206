"""report.html is drawn after the calibration finished: whatever names the upload brought, it must
be drawn, and a figure that cannot be drawn must not fail the job."""

import re

import pytest

from clcalib.report_html import mixed_figures, render

MATH = ["a$$b", r"$\frac{1}{0}$", "x^$_"]  # names matplotlib would parse as math and fail on


def _report(**extra):
    units = [{"name": n, "loss_before": 2.0, "loss_after": 1.0} for n in MATH]
    layers = [{"name": n, "weight_sqnr_db": 20.0, "output_sqnr_db": 15.0} for n in MATH]
    per_class = {"images": [5, 5, 5], "fp_top1": [90.0, 80.0, 70.0], "quant_top1": [85.0, 75.0, 65.0],
                 "confusion": [[4, 1, 0], [0, 5, 0], [1, 0, 4]]}
    return {"arch": "x", "config": {"method": "qdrop", "w_bits": 4, "a_bits": 4}, "metrics": {}, "units": units,
            "layers": layers, "per_class": per_class, "class_mapping": {n: i for i, n in enumerate(MATH)},
            "calib_sha256": "0" * 64, "checkpoint": "quantized.safetensors", **extra}


def test_names_that_read_as_math_are_drawn_as_written():
    html = render(_report())
    assert "could not be drawn" not in html
    assert html.count("<svg") == 4  # units, layers, classes, confusion
    for name in MATH:  # the figures' text is SVG text, escaped
        assert name.replace("<", "&lt;") in html
    # the log axis of the units' errors is labelled in numbers, not math source ("$\\mathdefault{10^{0}}$")
    assert "mathdefault" not in html and re.search(r"<text[^>]*>1</text>", html), html[:2000]


def test_the_sensitivity_figure_draws_math_like_site_names():
    site = {"name": "a$$b", "kind": "weight", "size": 10, "bits": 4, "fixed": False, "cost": {"2": 0.1, "8": 0.0},
            "top1_drop": {}, "bytes": {"2": 10, "8": 20}}
    assert mixed_figures({"sensitivity": [site]})["sensitivity"].startswith("<svg")


def test_a_figure_that_cannot_be_drawn_leaves_a_page_with_the_tables_and_says_why():
    broken = _report(units=[{"name": "u", "loss_before": 2.0}])  # an old report.json without loss_after
    with pytest.warns(RuntimeWarning, match="figures could not be drawn"):
        html = render(broken)
    assert "The figures could not be drawn" in html and "<svg" not in html
    assert "<h2>Units</h2>" in html


def test_hostile_unit_names_stay_text_in_the_figures():
    """Unit names come from an uploaded program's module names; the figures write them as SVG text."""
    units = [{"name": "</text></svg><script>alert(1)</script>", "loss_before": 2.0, "loss_after": 1.0},
             {"name": "]]><b>x</b> & y", "loss_before": 1.0, "loss_after": 0.5}]
    html = render({"arch": "x", "config": {"method": "qdrop", "w_bits": 4, "a_bits": 4}, "metrics": {}, "units": units,
                   "calib_sha256": "0" * 64, "checkpoint": "quantized.safetensors"})
    assert html.count("<svg") == 1 and "<script>" not in html and "<b>x</b>" not in html
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert "&lt;/text&gt;&lt;/svg&gt;&lt;script&gt;" in svg and "]]&gt;&lt;b&gt;x&lt;/b&gt; &amp; y" in svg
