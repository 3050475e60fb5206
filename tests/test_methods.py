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
