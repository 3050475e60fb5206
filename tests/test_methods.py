"""One registry says what each method does (clcalib.config.METHODS); nothing dispatches on names."""

import subprocess

from clcalib.config import METHODS, Granularity, Method


def test_every_method_has_exactly_one_spec():
    assert set(METHODS) == set(Method)
    assert [m.value for m in Method if not m.reconstructs] == ["minmax", "mse"]
    assert METHODS[Method.ADAROUND].granularity is Granularity.LAYER
    assert [m.value for m in Method if m.spec.drops_input] == ["qdrop", "pdquant"]


def test_the_engine_never_tests_a_method_by_name():
    out = subprocess.run(["grep", "-rnE", r"Method\.(MINMAX|MSE|ADAROUND|BRECQ|QDROP|PDQUANT)", "clcalib",
                          "--include=*.py"], capture_output=True, text=True)
    uses = [line for line in out.stdout.splitlines() if not line.startswith("clcalib/config.py")]
    assert uses == [], uses


def test_quantizer_settings_come_with_construction():
    """The method's range search and act_range_p reach every activation quantizer when it is made."""
    import torch

    from clcalib.config import CalibConfig
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.graph.registry import build_model
    from clcalib.quant.activation import ActQuantizer

    for method, p in (("minmax", 2.4), ("qdrop", 2.0)):
        spec = QuantSpec.from_config(CalibConfig(method=method, act_range_p=p))
        qm = QuantModel(build_model("resnet18", 10), spec, torch.zeros(1, 3, 32, 32))
        searches = {q.search for q in qm.modules() if isinstance(q, ActQuantizer)}
        assert searches == {spec.act_search} and spec.act_search.lp == (method != "minmax") and spec.act_search.p == p
