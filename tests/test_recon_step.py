"""The reconstruction step's schedule, the memory plan of each unit's caches, and the two ways the
step runs besides plain eager: with its caches in host memory (any machine) and captured into a
CUDA graph (only where CUDA is: the device script runs these on a GPU)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import clcalib
from clcalib.config import CalibConfig
from clcalib.recon.losses import beta_at
from clcalib.recon.placement import cache_bytes, plan_caches, working_bytes
from clcalib.recon.step import Schedule

GiB = 2**30


def test_schedule_is_adaround_beta_after_the_warm_up_and_torch_cosine_lr():
    cfg = CalibConfig(iters=200, warmup=0.2, lr_act=4e-5, beta=(20.0, 2.0))
    s = Schedule(cfg, cfg.iters, torch.device("cpu"))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr_act)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
    for it in range(cfg.iters):
        row = s.next_row()  # the step reads rows by a device counter, in order
        beta = beta_at(it, cfg.iters, cfg.warmup, *cfg.beta)
        assert s.regularized(it) == (beta is not None)
        if beta is None:
            assert math.isnan(float(row[Schedule.BETA]))
        else:
            assert float(row[Schedule.BETA]) == pytest.approx(beta, rel=1e-6)
        assert float(row[Schedule.LR_ACT]) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-5, abs=1e-12)
        opt.step()
        cosine.step()
    assert int(s.counter) == cfg.iters
    assert s.regularized(39) is False and s.regularized(40) is True  # warm-up: 20 % of 200


def test_the_plan_keeps_caches_on_the_device_when_they_fit_and_moves_them_to_host_memory_when_not():
    # ResNet-50's first bottleneck at 224 px, 1024 calibration images: in 64x56x56, out 256x56x56
    n_in, n_out = 64 * 56 * 56, 256 * 56 * 56
    cache = cache_bytes(1024, n_in, n_out, layer_wise=False)
    assert cache == 1024 * (2 * n_in + n_out) * 4  # quantized and FP inputs, FP outputs, float32
    work = working_bytes(32, n_in, n_out, n_layers=4)
    on_h200 = plan_caches("auto", cache, work, free=139 * GiB)
    on_8gib = plan_caches("auto", cache, work, free=8 * GiB)
    assert on_h200.where == "device"
    assert on_8gib.where == "host" and "exceed" in on_8gib.reason
    assert plan_caches("auto", cache, work, free=None).where == "device"  # the CPU: one memory
    assert plan_caches("host", cache, work, free=139 * GiB).where == "host"  # the user's override
    assert plan_caches("device", cache, work, free=1 * GiB).where == "device"
    # just at the edge: 90 % of the free memory may be filled
    assert plan_caches("auto", cache, work, free=math.ceil((cache + work) / 0.9)).where == "device"
    assert plan_caches("auto", cache, work, free=(cache + work)).where == "host"


@pytest.mark.parametrize("config", [
    {"method": "qdrop", "iters": 8},
    {"method": "pdquant", "iters": 4, "cl_calib": {"enabled": True}},  # added terms read the FP outputs from host memory
    {"method": "adaround", "iters": 4},  # layer-wise: per-layer caches follow the unit's plan
], ids=["qdrop", "pdquant+cl", "adaround"])
def test_caches_in_host_memory_give_the_same_model_as_caches_on_the_device(config, fmnist, reference):
    model, data = reference("resnet18"), fmnist["train"][:48]
    base = {**config, "w_bits": 2, "a_bits": 4, "calib_size": 48, "seed": 3, "device": "cpu"}
    on_device = clcalib.calibrate(model, data, {**base, "cache_placement": "device"})
    on_host = clcalib.calibrate(model, data, {**base, "cache_placement": "host"})
    assert {u.caches for u in on_host.units} == {"host"} and {u.caches for u in on_device.units} == {"device"}
    _same_model(on_device, on_host, "host-memory caches")


def _same_model(a, b, what: str) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{what} changed {len(different)} tensors, e.g. {different[:3]}"
    assert [u.loss_after for u in a.units] == [u.loss_after for u in b.units]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_speed.sh)")


@CUDA
@pytest.mark.parametrize(("arch", "method"), [("resnet18", "qdrop"), ("resnet18", "brecq"), ("resnet18", "adaround"),
                                              ("mobilenet_v2", "qdrop")])  # depthwise convs, ReLU6, round_weight 0.1
def test_steps_replayed_from_a_cuda_graph_give_the_eager_steps_model(arch, method, fmnist, reference):
    model, data = reference(arch), fmnist["train"][:256]
    base = {"method": method, "w_bits": 2, "a_bits": 4, "iters": 60, "calib_size": 256, "seed": 1, "device": "cuda"}
    eager = clcalib.calibrate(model, data, {**base, "step_capture": "off"})
    # the baseline: eager steps on this card repeat exactly, so a difference below is the graphs'
    _same_model(eager, clcalib.calibrate(model, data, {**base, "step_capture": "off"}), "a second eager run")
    graphed = clcalib.calibrate(model, data, {**base, "step_capture": "auto"})
    assert {u.steps for u in graphed.units} == {"graph"} and {u.steps for u in eager.units} == {"eager"}
    _same_model(eager, graphed, "graph replays")


@CUDA
@pytest.mark.parametrize("extra", [
    {"cl_calib": {"enabled": True}},
    {"cl_calib": {"enabled": True, "negatives": "bank", "symmetric": True, "critic": "nce", "lambda": 0.1}},
    {"method": "pdquant", "pdquant": {"reg_weight": 0.5}, "cl_calib": {"enabled": True, "tail_end": "features"}},
    {"method": "pdquant"},
    # every > 1: a graph for the turns and one for the iterations between, in both phases: the
    # warm-up long enough that its third turn is captured and later ones replayed
    {"cl_calib": {"enabled": True, "every": 4, "hold": True}, "iters": 60, "warmup": 0.5},
    {"cl_calib": {"enabled": True, "every": 4}, "iters": 60, "warmup": 0.5},
    {"method": "pdquant", "cl_calib": {"enabled": True, "every": 3, "hold": True}, "warmup": 0.5},
], ids=["qdrop+cl", "cl-bank-symmetric-nce", "pdquant+reg+cl-features", "pdquant", "cl-every4-hold", "cl-every4",
        "pdquant+cl-every3-hold"])
def test_steps_with_cl_or_pd_terms_replayed_from_a_cuda_graph_give_the_eager_steps_model(extra, fmnist, reference):
    model, data = reference("resnet18"), fmnist["train"][:256]
    base = {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": 30, "calib_size": 256, "seed": 3, "device": "cuda",
            **extra}
    eager = clcalib.calibrate(model, data, {**base, "step_capture": "off"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = clcalib.calibrate(model, data, {**base, "step_capture": "auto"})
    assert not [w for w in caught if "capture" in str(w.message)]  # no graph fell back to eager steps
    assert {u.steps for u in graphed.units} == {"graph"}
    _same_model(eager, graphed, "graph replays with the terms")
    assert [u.extra for u in graphed.units] == [u.extra for u in eager.units]  # the terms' curves, summed in place


@CUDA
def test_a_failed_cuda_graph_capture_falls_back_to_eager_steps_that_give_the_eager_model(fmnist, reference):
    import clcalib.recon.terms.unit as ut

    class Syncing:
        """Terms that claim to be capturable but read a value on the host every call."""

        capturable = True

        def __init__(self, inner):
            self.inner, self.rec_weight = inner, inner.rec_weight

        def __call__(self, out_q, target, idx):
            got = self.inner(out_q, target, idx)
            float(got["pd"])  # a host sync: the capture fails here, after the batch was drawn
            return got

    def factory(ctx):
        inner = ut.unit_terms(ctx)
        return Syncing(inner) if inner is not None else None

    model, data = reference("resnet18"), fmnist["train"][:256]
    base = {"method": "pdquant", "w_bits": 2, "a_bits": 4, "iters": 30, "calib_size": 256, "seed": 5, "device": "cuda"}
    eager = clcalib.calibrate(model, data, {**base, "step_capture": "off"}, terms=factory)
    with pytest.warns(RuntimeWarning, match="capture"):
        fell_back = clcalib.calibrate(model, data, {**base, "step_capture": "auto"}, terms=factory)
    assert {u.steps for u in fell_back.units} == {"eager"}
    _same_model(eager, fell_back, "eager steps after a failed capture")


@CUDA
def test_a_failed_cuda_graph_capture_of_the_turns_after_the_other_graph_gives_the_eager_model(fmnist, reference):
    import clcalib.recon.terms.unit as ut

    class SyncOnTurns:
        """Held CL terms that read a value on the host on their turns only: the graph of the
        iterations between is captured first (iteration 3), the turns' capture (iteration 8) fails."""

        capturable = True

        def __init__(self, inner):
            self.inner, self.rec_weight, self.every, self.held = inner, inner.rec_weight, inner.every, inner.held

        def __call__(self, out_q, target, idx, turn):
            got = self.inner(out_q, target, idx, turn)
            if turn:
                float(got["cl"])
            return got

    def factory(ctx):
        inner = ut.unit_terms(ctx)
        return SyncOnTurns(inner) if inner is not None else None

    model, data = reference("resnet18"), fmnist["train"][:256]
    base = {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": 40, "warmup": 0.5, "calib_size": 256, "seed": 6,
            "device": "cuda", "cl_calib": {"enabled": True, "every": 4, "hold": True}}
    eager = clcalib.calibrate(model, data, {**base, "step_capture": "off"}, terms=factory)
    with pytest.warns(RuntimeWarning, match="capture"):
        fell_back = clcalib.calibrate(model, data, {**base, "step_capture": "auto"}, terms=factory)
    assert {u.steps for u in fell_back.units} == {"eager"}  # a failed capture is reported, not hidden
    _same_model(eager, fell_back, "eager steps after the turns' capture failed")
    assert [u.extra for u in fell_back.units] == [u.extra for u in eager.units]


@CUDA
def test_host_memory_caches_on_cuda_give_the_device_caches_model(fmnist, reference):
    # pinned staging buffers, asynchronous copies and their events: only on CUDA
    model, data = reference("resnet18"), fmnist["train"][:256]
    base = {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": 60, "calib_size": 256, "seed": 2, "device": "cuda"}
    on_device = clcalib.calibrate(model, data, {**base, "cache_placement": "device"})  # graph replays
    on_host = clcalib.calibrate(model, data, {**base, "cache_placement": "host"})  # eager, staged batches
    assert {u.caches for u in on_host.units} == {"host"} and {u.steps for u in on_host.units} == {"eager"}
    _same_model(on_device, on_host, "host-memory caches")


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "resnet50"])
def test_conversion_keeps_a_model_on_its_own_device(arch):
    # a model already on the GPU (the pipeline evaluates the FP model there first) once failed at
    # BatchNorm folding: a bias-less conv got a CPU zero bias. The meta device shows any tensor
    # the conversion makes on the CPU instead of beside the model, without a GPU.
    from clcalib.graph.partition import QuantModel, QuantSpec
    from clcalib.graph.registry import build_model
    from clcalib.quant.switch import quantization

    cfg = CalibConfig.model_validate({"method": "qdrop", "w_bits": 2, "a_bits": 4})
    x = torch.zeros(2, 3, 28, 28, device="meta")
    qm = QuantModel(build_model(arch, 10).eval().to("meta"), QuantSpec.from_config(cfg), x, cfg.partition).to("meta")
    with quantization(qm, False):
        assert qm(x).device.type == "meta"


@CUDA
def test_a_model_already_on_the_gpu_gives_the_model_of_one_on_the_cpu(fmnist, reference):
    data = fmnist["train"][:256]
    base = {"method": "qdrop", "w_bits": 2, "a_bits": 4, "iters": 20, "calib_size": 256, "seed": 4, "device": "cuda"}
    from_cpu = clcalib.calibrate(reference("resnet18"), data, base)
    from_gpu = clcalib.calibrate(reference("resnet18").cuda(), data.cuda(), base)
    _same_model(from_cpu, from_gpu, "a model and data already on the GPU")
