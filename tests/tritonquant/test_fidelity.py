"""Compressed training on real data (scikit-learn's digits) ends where exact training ends.

Margins come from the sweep in docs/fidelity.md (3 seeds, 300 steps, 360 held-out images, so one
image is 0.28 points): exact 0.9898 +/- 0.0032, 8 bits 0.9907, 4 bits 0.9898, and 2 bits with the
BatchNorm inputs at 8 bits 0.9796 +/- 0.0085 (worst seed -0.019), and a 2-bit average with its plan
measured by ``tq.calibrate`` (every 50 steps, the default probability floor) 0.9898 +/- 0.0042 at 14.2x.
Uniform 2 bits ends at 0.844 +/- 0.067 there.
"""

import pytest
from torch import nn

pytest.importorskip("sklearn")

from tritonquant.fidelity import MeasuredAuto, compress_context, digits_task, train_run  # noqa: E402

pytestmark = pytest.mark.slow

BATCHNORM_AT_8_BITS = {nn.BatchNorm2d: {"bits": 8}}


@pytest.fixture(scope="module")
def task():
    return digits_task(steps=300)


@pytest.fixture(scope="module")
def exact_accuracy(task):
    accuracy = train_run(task, "exact", None, seed=0).final
    assert accuracy > 0.97, "the task itself must be learnable in 300 steps"
    return accuracy


@pytest.mark.parametrize("bits, margin", [(8, 0.015), (4, 0.015)], ids=["8bit", "4bit"])
def test_uniform_widths_train_as_well_as_exact(task, exact_accuracy, bits, margin):
    run = train_run(task, f"{bits}bit", compress_context(bits=bits), seed=0)
    assert run.final >= exact_accuracy - margin
    assert run.packed_ratio > 32 / (bits + 0.25) * 0.97


def test_two_bits_with_batchnorm_inputs_at_eight_bits_stays_close(task, exact_accuracy):
    run = train_run(task, "2bit+bn8", compress_context(bits=2, overrides=BATCHNORM_AT_8_BITS), seed=0)
    assert run.final >= exact_accuracy - 0.03


def test_two_bit_average_with_a_measured_plan_trains_as_well_as_exact(task, exact_accuracy):
    run = train_run(task, "measured-2.0", MeasuredAuto(budget=2.0, calibrate_every=50), seed=0)
    assert run.final >= exact_accuracy - 0.015
    assert run.packed_ratio > 32 / (2 + 0.25) * 0.95
