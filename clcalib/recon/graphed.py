"""The reconstruction step captured once per phase into a CUDA graph and replayed.

On a GPU the eager step is bound by kernel launches and Python (measured on an H200: ~3.4 ms per
iteration at 28 px for arithmetic that takes microseconds); a replay launches the whole
iteration (sampling, forward, losses, backward, both Adam steps, the schedule and the loss
sums) as one graph. The step is the same ``Step`` the eager path runs, on the same tensors and
the same generator, so a replay computes what an eager call would: the first iterations of each
phase run eagerly (they initialise the optimisers and warm the allocator up, as the CUDA graph
recipe asks), then one iteration is captured and every later one is a replay.

Used only where capture is sound: a CUDA device, caches on the device (the host-memory plan
syncs per iteration), added loss terms only where they say they are capturable (PD-Quant's, and
CL-Calib's on every iteration without sampled negatives: clcalib.recon.terms.unit), and a torch
that can capture a seeded generator.
"""

from __future__ import annotations

import warnings

import torch

from clcalib.recon.step import Step

EAGER_BEFORE_CAPTURE = 2  # per phase: the first runs initialise Adam's state, the second warms the allocator


def terms_capturable(terms) -> bool:
    """Whether a unit's terms (None: none) may be captured: they say ``capturable``, and hold no
    gradient between turns (a replay would re-add the captured one and never run the turns)."""
    return terms is None or (getattr(terms, "capturable", False) and not getattr(terms, "held", None))


def can_capture(device: torch.device, caches_on_device: bool, terms_capturable: bool) -> bool:
    return (device.type == "cuda" and caches_on_device and terms_capturable
            and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


class GraphedStep:
    """Calls ``step(regularized)`` like the eager loop does, replaying a captured graph once each
    phase has run ``EAGER_BEFORE_CAPTURE`` eager iterations."""

    def __init__(self, step: Step):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.phase: bool | None = None
        self.eager_runs = 0
        self.side = torch.cuda.Stream(device=step.device)
        self.captures = 0
        self.failed = False

    def __call__(self, regularized: bool) -> None:
        if regularized != self.phase:  # warm-up -> regularized: the old graph is never replayed again
            self.phase, self.graph, self.eager_runs = regularized, None, 0
        if self.failed:
            self._on_side_stream(lambda: self.step(regularized))
            return
        if self.graph is not None:
            self.graph.replay()
            return
        if self.eager_runs < EAGER_BEFORE_CAPTURE:
            self._on_side_stream(lambda: self.step(regularized))
            self.eager_runs += 1
            return
        self.graph = self._capture(regularized)
        if self.graph is None:  # capture failed: this step stays eager (warned once)
            self._on_side_stream(lambda: self.step(regularized))
            return
        self.graph.replay()  # capture records the iteration; the replay runs it

    def _on_side_stream(self, fn) -> None:
        # the CUDA graph recipe: warm-up work on a side stream, ordered with the current one
        cur = torch.cuda.current_stream(self.step.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            fn()
        cur.wait_stream(self.side)

    def _capture(self, regularized: bool) -> torch.cuda.CUDAGraph | None:
        """The graph of one step, or None if capture failed. A capture runs no kernel, and the
        batch generator's state is put back after a failure (the capture may have drawn a batch
        before the failing op), so falling back to eager steps keeps the result exact."""
        step = self.step
        saved_gen = step.gen.get_state()
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(step.gen)  # replays draw the generator's next numbers, as eager calls would
        # gradients are created inside the graph's memory and rewritten by every replay
        step.opt_w.zero_grad(set_to_none=True)
        if step.opt_a is not None:
            step.opt_a.zero_grad(set_to_none=True)
        try:
            # thread_local: a progress or heartbeat thread may use CUDA while this thread captures
            with torch.cuda.graph(graph, stream=self.side, capture_error_mode="thread_local"):
                step(regularized)
        except RuntimeError as e:
            self.failed = True
            try:
                step.gen.set_state(saved_gen)
            except RuntimeError as e2:  # never go on with a generator in an unknown state
                raise RuntimeError(f"CUDA graph capture of the reconstruction step failed ({e}), and its batch "
                                   f"generator could not be restored ({e2}); run with step_capture 'off'") from e
            warnings.warn(f"CUDA graph capture of the reconstruction step failed, running it eagerly "
                          f"(same result, slower): {e}", RuntimeWarning, stacklevel=2)
            return None
        # the capture's own device work (generator state) ran on the side stream
        torch.cuda.current_stream(step.device).wait_stream(self.side)
        self.captures += 1
        return graph
