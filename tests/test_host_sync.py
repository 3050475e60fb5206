"""The reconstruction loop never waits on the device once per iteration: every read of a
tensor's value on the host (``.item()``, ``float(t)``, ``if t:``) dispatches
``aten._local_scalar_dense``, which on CUDA blocks until the queued kernels have run. Counted
here on the CPU, where the same code dispatches the same ops."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clcalib
from clcalib.recon.engine import Reconstructor

ITERS = 40


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", [  # pdquant is qdrop's block step with terms: it runs qdrop's path too
    {"method": "pdquant", "cl_calib": {"enabled": True}},
    {"method": "adaround"},
], ids=["pdquant+cl", "adaround"])
def test_the_loop_reads_the_device_once_per_reporting_window_not_per_iteration(config, fmnist, reference, monkeypatch):
    reads: list[tuple[int, int]] = []  # (host reads, values reported) per reconstruction
    optimize = Reconstructor._optimize

    def counted(self, k, module, layers, x_q, x_fp, y_f, gen, extra, plan):
        # a middle block and the classifier; the rest (the stem's FP tail for PD/CL: the whole
        # network) runs outside Python dispatch, which is slow, and one iteration each
        if k not in (len(self.units) // 2, len(self.units) - 1):
            cfg, self.cfg = self.cfg, self.cfg.model_copy(update={"iters": 1})
            try:
                return optimize(self, k, module, layers, x_q, x_fp, y_f, gen, extra, plan)
            finally:
                self.cfg = cfg
        with _HostReads() as mode:
            how = optimize(self, k, module, layers, x_q, x_fp, y_f, gen, extra, plan)
        reads.append((mode.n, 1 + len(extra)))  # the loss and each added term's curve
        return how

    monkeypatch.setattr(Reconstructor, "_optimize", counted)
    clcalib.calibrate(reference("resnet18"), fmnist["train"][:32],  # batches of 8: reads, not compute, are counted
                      {**config, "w_bits": 4, "a_bits": 4, "iters": ITERS, "calib_size": 32, "batch_size": 8, "seed": 0})
    assert reads, "no reconstruction ran"
    windows = 20  # progress is reported every ITERS // 20 iterations: one read per reported value
    assert all(n == windows * values for n, values in reads), f"(host reads, values) per reconstruction of {ITERS} iterations: {reads}"
