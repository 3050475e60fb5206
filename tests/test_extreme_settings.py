"""Settings at the edge of their range: refused by the config where they cannot work, and a run
whose loss turns non-finite anyway stops at once with the settings to look at, not after its
export (a tenant's job used to calibrate to the end and then fail on a NaN step size)."""

import pytest
import torch
from pydantic import ValidationError

import clcalib
from clcalib.config import CalibConfig
from clcalib.errors import ConfigError


@pytest.mark.parametrize("cfg", [{"cl_calib": {"tau": 5e-324}}, {"pdquant": {"temperature": 1e-300}},
                                 {"beta": [1e308, 1e308]}], ids=["tau", "temperature", "beta"])
def test_settings_that_overflow_the_loss_are_refused(cfg):
    with pytest.raises(ValidationError):
        CalibConfig.model_validate(cfg)


def test_a_loss_that_turns_non_finite_stops_the_run_at_the_first_report(reference, fmnist):
    calls = []

    class Poison:
        rec_weight = 1.0

        def __call__(self, out_q, target, idx):
            calls.append(1)
            return {"poison": out_q.sum() * torch.tensor(float("nan"))}

    cfg = {"method": "qdrop", "w_bits": 4, "a_bits": 4, "iters": 40, "calib_size": 32, "batch_size": 8}
    with pytest.raises(ConfigError, match=r"unit conv1: the reconstruction and poison loss became non-finite "
                                          r"by iteration 2; .*bring it toward its default"):
        clcalib.calibrate(reference("resnet18"), fmnist["train"][:32], cfg, terms=lambda ctx: Poison())
    assert len(calls) == 2  # the first unit's first report window (40 // 20 iterations), not the whole run
