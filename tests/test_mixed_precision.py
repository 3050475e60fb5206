"""Mixed precision on the real reference models and Fashion-MNIST: per-site bits reach the
checkpoint and `clcalib inspect`; the allocation keeps its budget and never predicts
worse than the uniform choice it replaces; the accuracy target returns the smallest candidate that
meets it, and bad budgets and targets are refused in one line before calibration."""

from __future__ import annotations

import json

import pytest

from clcalib.config import CalibConfig
from clcalib.errors import ConfigError
from clcalib.export import load_quantized
from clcalib.graph.partition import QuantModel, QuantSpec
from clcalib.mixed.allocate import allocate, check_budget, size_of
from clcalib.mixed.plan import OutOfTime, Probe, search
from clcalib.mixed.sensitivity import measure
from clcalib.pipeline import run_calibration
from clcalib.quant.sites import bits_of, site_modules
from clcalib.testing import PREPROCESS as PRE
from clcalib.testing import REFERENCE, calibration_indices, run_cli, write_zip

RESNET = REFERENCE / "fmnist_resnet18.safetensors"


@pytest.fixture(scope="module")
def zips(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    return {"calib": write_zip(d / "calib.zip", "train", calibration_indices(64, seed=0), by_class=False),
            "eval": write_zip(d / "eval.zip", "t10k", range(300), by_class=True)}


@pytest.fixture(scope="module")
def costs(reference, fmnist):
    cfg = CalibConfig(w_bits=4, a_bits=8)
    x = fmnist["train"][:32]
    qm = QuantModel(reference("resnet18"), QuantSpec.from_config(cfg), x[:2], cfg.partition)
    return measure(qm, x, (2, 4, 8), (4, 8), mse=False)  # min/max ranges: the MSE search costs minutes here


def test_allocation_keeps_the_budget_and_predicts_no_worse_than_uniform(costs):
    uniform_bits = {c.name: 4 for c in costs if c.kind == "weight" and not c.fixed}
    uniform_bytes, _, _ = size_of(costs, uniform_bits)
    uniform_cost = sum(c.cost[4] for c in costs if c.name in uniform_bits)
    alloc = allocate(costs, weight_bytes=uniform_bytes)
    assert alloc.weight_bytes <= uniform_bytes
    assert alloc.predicted_cost <= uniform_cost + 1e-12  # uniform W4 is one of the allocations it chose among
    assert set(alloc.layer_bits.values()) - {4}, "the budget of uniform W4 was spent unevenly"
    fixed = [c for c in costs if c.fixed]  # first conv, classifier, the classifier's input: first_last_bits
    assert len(fixed) == 3 and not set(alloc.layer_bits) & {c.name for c in fixed}
    # activations too: the element-weighted average stays within its budget
    both = allocate(costs, weight_bytes=uniform_bytes, a_bits_avg=6.0)
    assert both.a_bits_avg <= 6.0 + 1e-9 and both.weight_bytes <= uniform_bytes
    acts = allocate([c for c in costs if c.kind == "act"], a_bits_avg=6.0)  # weights keep w_bits, unmeasured
    assert acts.a_bits_avg <= 6.0 + 1e-9 and acts.weight_bytes is None and acts.w_bits_avg is None
    assert set(acts.layer_bits) <= {c.name for c in costs if c.kind == "act"}


def test_a_budget_below_the_smallest_model_is_one_line(reference, fmnist):
    net = reference("resnet18")
    for budget, message in (({"weight_mb": 0.001}, r"budget.weight_mb 0.001 is below the smallest model these "
                                                   r"choices allow \(2.847 MB"),
                            ({"w_bits_avg": 2.0}, r"budget.w_bits_avg 2 is below .* \(2.008 bits")):
        cfg = CalibConfig(budget=budget)
        qm = QuantModel(net, QuantSpec.from_config(cfg), fmnist["train"][:2], cfg.partition)
        with pytest.raises(ConfigError, match=message):
            check_budget(qm, cfg)
    cfg = CalibConfig(budget={"w_bits_avg": 2.0}, first_last_bits=None)  # first/last free too: 2 bits fit
    check_budget(QuantModel(net, QuantSpec.from_config(cfg), fmnist["train"][:2], cfg.partition), cfg)
    # an activation budget: its sizes need one image through the model; refused before any measuring
    cfg = CalibConfig(budget={"a_bits_avg": 2.0})  # first/last stay at 8 bits: above 2 on average
    qm = QuantModel(net, QuantSpec.from_config(cfg), fmnist["train"][:2], cfg.partition)
    with pytest.raises(ConfigError, match=r"budget.a_bits_avg 2 is below the smallest average these choices allow "
                                          r"\(2\.\d+ bits: every free activation at 2 bits"):
        check_budget(qm, cfg, fmnist["train"][:1])
    check_budget(qm, CalibConfig(budget={"a_bits_avg": 2.5}), fmnist["train"][:1])


def test_layer_bits_set_the_named_sites_only(reference, fmnist):
    bits = {"layer1.0.conv1": 2, "layer3.1.conv2": 8, "layer1.0.conv1.out_quant": 8, "fc": 3}
    cfg = CalibConfig(w_bits=4, a_bits=4, layer_bits=bits)
    qm = QuantModel(reference("resnet18"), QuantSpec.from_config(cfg), fmnist["train"][:2], cfg.partition)
    sites = site_modules(qm.model)
    assert {n: bits_of(sites[n]) for n in bits} == bits  # fc: an explicit entry wins over first_last_bits
    assert bits_of(sites["layer1.0.conv2"]) == 4 and bits_of(sites["layer1.0.out_quant"]) == 4
    assert bits_of(sites["conv1"]) == 8  # first_last_bits


def test_an_unknown_layer_name_says_what_the_names_look_like(zips, tmp_path):
    cfg = CalibConfig(method="minmax", preprocess=PRE, calib_size=64, layer_bits={"layer9.conv1": 2})
    with pytest.raises(ConfigError, match=r"'layer9.conv1'.*named like conv1, conv1.out_quant"):
        run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], config=cfg,
                        out_dir=tmp_path)


def test_budget_run_stays_in_budget_and_its_bits_reach_checkpoint_and_inspect(zips, tmp_path):
    cfg = CalibConfig(method="minmax", w_bits=3, a_bits=8, preprocess=PRE, calib_size=64,
                      budget={"w_bits_avg": 3.5, "images": 16})
    report = run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], config=cfg,
                             out_dir=tmp_path, evaluation=zips["eval"])
    mp = report["mixed_precision"]
    bits = mp["allocation"]["layer_bits"]
    assert mp["allocation"]["w_bits_avg"] <= 3.5 + 1e-9 and len(set(bits.values())) > 1
    assert report["metrics"]["weight_bytes"] == mp["allocation"]["weight_bytes"]  # the checkpoint is what was planned
    assert report["config"]["layer_bits"] == bits  # rerunnable from the report alone
    sites = site_modules(load_quantized(tmp_path / "quantized.safetensors").model)
    assert {n: bits_of(sites[n]) for n in bits} == bits
    assert "Mixed precision" in (tmp_path / "report.html").read_text()
    (tmp_path / "cfg.json").write_text(json.dumps({"layer_bits": bits}))
    r = run_cli("inspect", "--arch", "resnet18", "--num-classes", "10", "--input-size", "28", "--config",
                tmp_path / "cfg.json", "--json")
    assert r.returncode == 0, r.stderr
    layers = {la["name"]: la for u in json.loads(r.stdout) for la in u["layers"]}
    assert {n: layers[n]["w_bits"] for n in bits} == bits


def test_target_returns_the_smallest_candidate_that_meets_it(zips, tmp_path):
    cfg = CalibConfig(method="minmax", w_bits=4, a_bits=8, preprocess=PRE, calib_size=64,
                      target={"max_top1_drop": 1.0, "w_bits_avg": [2.2, 4.0, 8.0], "images": 16})
    report = run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], config=cfg,
                             out_dir=tmp_path, evaluation=zips["eval"])
    s = report["mixed_precision"]["search"]
    probes = {p["w_bits_avg"]: p for p in s["probes"]}
    assert s["met"] and probes[s["chosen_w_bits_avg"]]["meets"]
    assert all(not p["meets"] for b, p in probes.items() if b < s["chosen_w_bits_avg"]), probes
    m = report["metrics"]
    assert m["fp_top1"] - m["quant_top1"] <= 1.0  # measured again on the reloaded checkpoint
    assert m["weight_bytes"] == probes[s["chosen_w_bits_avg"]]["weight_bytes"]
    assert "Accuracy target" in (tmp_path / "report.html").read_text()


def test_target_refusals_come_before_calibration(zips, tmp_path):
    with pytest.raises(ConfigError, match="config.target needs an evaluation set"):
        run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], out_dir=tmp_path,
                        config=CalibConfig(preprocess=PRE, target={"max_top1_drop": 1.0}))
    small = {"method": "minmax", "preprocess": PRE, "calib_size": 64}
    with pytest.raises(ConfigError, match="no candidate of target.w_bits_avg"):
        run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], out_dir=tmp_path,
                        evaluation=zips["eval"], config=CalibConfig(
                            **small, target={"max_top1_drop": 1.0, "w_bits_avg": [2.0], "images": 8}))
    with pytest.raises(ConfigError, match="time_budget_s of 0.001 s ended before the first candidate"):
        run_calibration(arch="resnet18", num_classes=10, weights=RESNET, calibration=zips["calib"], out_dir=tmp_path,
                        evaluation=zips["eval"], config=CalibConfig(
                            **small, target={"max_top1_drop": 1.0, "images": 8, "time_budget_s": 0.001}))


def _ladder(n: int):
    from clcalib.mixed.allocate import Allocation

    return [(float(b), Allocation({}, 1000 * b, float(b), None, 0.0)) for b in range(2, 2 + n)]


def test_search_finds_the_smallest_meeting_and_keeps_the_best_when_time_runs_out():
    accuracy = {0: 80.0, 1: 88.0, 2: 90.7, 3: 91.0, 4: 91.2, 5: 91.5}  # grows with size; FP 91.6, target 1.0
    tried = []

    def run(i):
        tried.append(i)
        return accuracy[i]

    best, probes, stopped = search(_ladder(6), run, 91.6, 1.0, None, lambda e: None)
    assert best == 2 and not stopped and len(tried) <= 3  # binary search: log2(6) probes
    assert all(isinstance(p, Probe) for p in probes)

    def cut(i):  # the first candidate finishes, the time budget stops the second
        if tried:
            raise OutOfTime()
        tried.append(i)
        return accuracy[i]

    tried.clear()
    best, probes, stopped = search(_ladder(6), cut, 91.6, 0.1, None, lambda e: None)
    assert stopped and best == tried[0] and probes[-1].top1 is None  # the best found so far, not an error


def test_sensitivity_cli_prints_the_table(zips, tmp_path):
    r = run_cli("sensitivity", "--arch", "resnet18", "--num-classes", "10", "--weights", RESNET, "--calib",
                zips["calib"], "--method", "minmax", "--resize", "none", "--crop", "none", "--mean", "0.286", "--std", "0.353",
                "--images", "16", "--w-widths", "2,8", "--json", tmp_path / "s.json", "--plot", tmp_path / "s.svg")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "layer4.1.conv2" in out and "KL @2" in out and "sites measured" in out
    table = json.loads((tmp_path / "s.json").read_text())["mixed_precision"]["sensitivity"]
    assert all(c["cost"]["2"] >= c["cost"]["8"] for c in table)  # fewer bits move the predictions more
    assert (tmp_path / "s.svg").read_text().startswith("<svg")


def test_a_hostile_site_name_is_text_in_report_html():
    """Site names come from an uploaded program's module names, which may hold markup."""
    from clcalib.report_html import render

    name = '<img src=x onerror="alert(1)">'
    site = {"name": name, "kind": "weight", "size": 10, "bits": 4, "fixed": False, "cost": {"2": 0.1, "8": 0.0},
            "top1_drop": {}, "bytes": {"2": 10, "8": 20}}
    mixed = {"sensitivity": [site], "sensitivity_seconds": 1.0, "proxy_check": None,
             "uniform": {"weight_bytes": 20, "w_bits_avg": 4.0, "a_bits_avg": None},
             "allocation": {"layer_bits": {name: 2}, "weight_bytes": 10, "w_bits_avg": 2.0, "a_bits_avg": None,
                            "predicted_cost": 0.1}}
    html = render({"arch": "x", "config": {"method": "qdrop", "w_bits": 4, "a_bits": 4, "layer_bits": {name: 2}},
                   "metrics": {}, "mixed_precision": mixed, "calib_sha256": "0" * 64,
                   "checkpoint": "quantized.safetensors"})
    assert "Mixed precision" in html and "<img src=x" not in html and "&lt;img src=x" in html
