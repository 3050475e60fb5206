"""The reconstruction step captured once per phase into a CUDA graph and replayed.

On a GPU the eager step is bound by kernel launches and Python (measured on an H200: ~3.4 ms per
iteration at 28 px for arithmetic that takes microseconds); a replay launches the whole
iteration (sampling, forward, losses, backward, both Adam steps, the schedule and the loss
sums) as one graph. The step is the same ``Step`` the eager path runs, on the same tensors and
the same generator, so a replay computes what an eager call would: the first iterations of each
phase run eagerly (they initialise the optimisers and warm the allocator up, as the CUDA graph
recipe asks), then one iteration is captured and every later one is a replay.

Terms that come on some iterations only (``cl_calib.every``, with or without ``hold``) do
different device work on their turns: each kind of iteration (turn or not) gets its own graph,
and the host, which knows the iteration number, picks which to replay.

Used only where capture is sound: a CUDA device, caches on the device (the host-memory plan
syncs per iteration), added loss terms only where they say they are capturable (PD-Quant's, and
CL-Calib's without sampled negatives: clcalib.recon.terms.unit), and a torch that can capture a
seeded generator.
"""

from __future__ import annotations

import warnings

import torch

from clcalib.recon.step import Step

EAGER_BEFORE_CAPTURE = 2  # per phase: the first runs initialise Adam's state, the second warms the allocator


def terms_capturable(terms) -> bool:
    """Whether a unit's terms (None: none) may be captured: they say ``capturable``."""
    return terms is None or getattr(terms, "capturable", False)


def can_capture(device: torch.device, caches_on_device: bool, terms_capturable: bool) -> bool:
    return (device.type == "cuda" and caches_on_device and terms_capturable
            and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))


class GraphedStep:
    """Calls ``step(it)`` like the eager loop does, replaying a captured graph of each kind of
    iteration (``step.phase(it)``) once that kind has run ``EAGER_BEFORE_CAPTURE`` eager
    iterations."""

    def __init__(self, step: Step):
        self.step = step
        self.regularized: bool | None = None
        # per turn (True/False) in the current phase: the graph and the loss terms it sums
        self.graphs: dict[bool, tuple[torch.cuda.CUDAGraph, set[str]]] = {}
        self.eager_runs: dict[bool, int] = {}
        self.side = torch.cuda.Stream(device=step.device)
        self.captures = 0
        self.failed = False

    def __call__(self, it: int) -> None:
        step = self.step
        regularized, turn = step.phase(it)
        if regularized != self.regularized:  # warm-up -> regularized: the old graphs are never replayed again
            self.regularized, self.graphs, self.eager_runs = regularized, {}, {}
        if self.failed:
            self._on_side_stream(lambda: step(it))
            return
        if turn in self.graphs:
            graph, keys = self.graphs[turn]
            graph.replay()
            step.added_since |= keys  # what the eager call's Python would have noted
            return
        if self.eager_runs.get(turn, 0) < EAGER_BEFORE_CAPTURE:
            self._on_side_stream(lambda: step(it))
            self.eager_runs[turn] = self.eager_runs.get(turn, 0) + 1
            return
        graph = self._capture(it)
        if graph is None:  # capture failed: this step stays eager (warned once)
            self._on_side_stream(lambda: step(it))
            return
        self.graphs[turn] = (graph, set(step.last_keys))
        graph.replay()  # capture records the iteration (its Python noted the terms); the replay runs it

    def _on_side_stream(self, fn) -> None:
        # the CUDA graph recipe: warm-up work on a side stream, ordered with the current one
        cur = torch.cuda.current_stream(self.step.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            fn()
        cur.wait_stream(self.side)

    def _capture(self, it: int) -> torch.cuda.CUDAGraph | None:
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
                step(it)
        except RuntimeError as e:
            self.failed = True
            self.graphs.clear()  # never replayed again (every later step runs eagerly): free their pools
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
