"""Where a unit's cached tensors live during its reconstruction: on the device, or in host memory,
streamed to the device one batch at a time.

Block reconstruction keeps, for every calibration image, the unit's quantized input, its FP
input and its FP output. At 224 px with 1024 images the first ResNet-50 units need ~10 GiB for
these alone, which a smaller GPU cannot hold beside the model and the step's working memory. The
plan is made per unit from the free device memory: the caches stay on the device when they fit
(the fast path, which can be captured into a CUDA graph), else they go to host memory and each
iteration copies its batch over (one host sync per iteration; the same batches, so the same
result as the device plan).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

Where = Literal["device", "host"]

BYTES = 4  # float32 caches
# the step's working memory per batch element, in units of the larger of the unit's per-sample
# input and output: saved activations of each layer, their gradients, QDrop's mixed input and
# the soft weights' intermediates (a bound measured loosely; a wrong guess costs speed, not memory,
# only when it is too small)
WORK_PER_LAYER, WORK_FIXED = 6, 8
DEVICE_SHARE = 0.9  # of the free memory the plan may fill: the allocator fragments


@dataclass(frozen=True)
class CachePlan:
    where: Where
    cache_bytes: int  # the unit's cached inputs/outputs over the calibration set
    working_bytes: int  # the estimated working memory of one step
    free_bytes: int | None  # free device memory when planned; None on the CPU (one memory)
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def cache_bytes(n: int, in_numel: int, out_numel: int, layer_wise: bool) -> int:
    """Bytes of a unit's caches for ``n`` samples with ``in_numel``/``out_numel`` elements each:
    quantized and FP inputs and FP outputs; layer-wise reconstruction also keeps one layer's."""
    per_sample = 2 * in_numel + out_numel
    if layer_wise:
        per_sample += 2 * max(in_numel, out_numel)
    return n * per_sample * BYTES


def working_bytes(batch: int, in_numel: int, out_numel: int, n_layers: int) -> int:
    return batch * max(in_numel, out_numel) * BYTES * (WORK_PER_LAYER * n_layers + WORK_FIXED)


def plan_caches(choice: str, cache: int, working: int, free: int | None) -> CachePlan:
    """``choice``: "device" or "host" (the user's override), or "auto": the device when the
    caches and the working memory fit in ``DEVICE_SHARE`` of ``free`` (always on the CPU)."""
    if choice in ("device", "host"):
        return CachePlan(choice, cache, working, free, "set by cache_placement")
    if free is None:
        return CachePlan("device", cache, working, free, "CPU: one memory")
    budget = int(free * DEVICE_SHARE)
    if cache + working <= budget:
        return CachePlan("device", cache, working, free, f"caches + working memory fit in {DEVICE_SHARE:.0%} of the free device memory")
    return CachePlan("host", cache, working, free, f"caches + working memory ({_gib(cache + working)}) exceed "
                     f"{DEVICE_SHARE:.0%} of the free device memory ({_gib(free)})")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def free_device_bytes(device: torch.device) -> int | None:
    """Memory the caches could take on ``device``: free on the card plus what torch's allocator
    holds unused; None on the CPU."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class Stager:
    """``stage(t, idx)`` = ``t[idx]`` on ``device``. With ``host`` (the host plan) the cached
    tensors live in host memory: their rows are gathered into a pinned buffer and copied
    asynchronously, and reading ``idx`` on the host is the one sync per iteration."""

    def __init__(self, device: torch.device, host: bool):
        self.device, self.host = device, host
        self._idx: tuple[Tensor, Tensor] | None = None  # (device idx, its host copy)
        self._bufs: dict[int, tuple[Tensor, torch.cuda.Event | None]] = {}

    def __call__(self, t: Tensor, idx: Tensor) -> Tensor:
        if not self.host:
            return t[idx]
        if self._idx is None or self._idx[0] is not idx:  # x_q, x_fp and y_f share one batch
            self._idx = (idx, idx.to("cpu"))
        idx_cpu = self._idx[1]
        if self.device.type == "cpu":  # nothing to copy; a reused buffer would alias last iteration's batch
            return torch.index_select(t, 0, idx_cpu)
        buf, copied = self._bufs.get(id(t), (None, None))
        if buf is None or buf.shape[0] != len(idx_cpu):
            buf = torch.empty((len(idx_cpu), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        elif copied is not None:
            copied.synchronize()  # the previous batch's copy out of this buffer has finished
        torch.index_select(t, 0, idx_cpu, out=buf)
        out = buf.to(self.device, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        self._bufs[id(t)] = (buf, copied)
        return out
