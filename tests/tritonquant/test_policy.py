"""policy.py's rules, one function at a time, at the edges where each rule's answer changes.

The blocks' behaviour built on these rules (what a model's step packs and keeps) is tested in
test_session.py; here each rule is asked directly, so that a boundary moved by one shows.
"""

import pytest
import torch
from torch import nn

from tritonquant import policy
from tritonquant.policy import (cast_source, is_frozen_weight_cast, is_row_statistic, narrow_index_dtype, recastable,
                                weight_cast_source)


@pytest.mark.parametrize("shape, recent, expected", [
    ((4096, 1), [], True),  # LayerNorm's mean and rstd: one value per row
    ((2, 4, 128), [(2, 4, 128, 32)], True),  # attention's log-sum-exp, saved after its query
    ((2, 4, 128), [(2, 4, 128, 32), (2, 4, 128, 32), (7, 7)], True),  # among the last few shapes
    ((2, 4, 128), [(2, 4, 64, 32)], False),  # one less dimension, but not the query's rows
    ((2, 4, 128), [(2, 4, 128)], False),  # the same rank
    ((2, 4, 128), [], False),
    ((), [(1,)], False),  # a scalar is no row statistic
], ids=["last-dim-1", "lse-after-query", "lse-among-recent", "other-rows", "same-rank", "nothing-recent", "scalar"])
def test_a_row_statistic_is_a_last_dim_of_1_or_a_recent_saves_shape_without_its_last_dim(shape, recent, expected):
    t = torch.zeros(shape)
    assert is_row_statistic(t, [torch.Size(s) for s in recent]) is expected


@pytest.mark.parametrize("plane, expected", [
    ((1, 2**15), torch.int16), ((1, 2**15 + 1), torch.int32), ((128, 256), torch.int16), ((3, 10923), torch.int32),
    ((2, 2**30), torch.int32), ((1, 2**31 + 1), None),
], ids=["2**15-positions", "2**15+1", "128x256", "3x10923", "2**31-positions", "2**31+1"])
def test_pool_indices_narrow_to_the_smallest_type_that_holds_every_position_of_a_plane(plane, expected):
    # An index is a position in its input plane, 0 .. H*W - 1: int16 holds planes of up to 2**15
    # positions, int32 up to 2**31. Only the input's shape is read, so no plane is allocated here.
    indices = torch.zeros(1, dtype=torch.int64)
    assert narrow_index_dtype(indices, nn.AdaptiveMaxPool2d(2), torch.Size((1, 1, *plane))) is expected


def test_only_max_pooling_modules_int64_indices_are_narrowed():
    shape = torch.Size((1, 1, 8, 8))
    assert narrow_index_dtype(torch.zeros(1, dtype=torch.int64), nn.MaxPool2d(2), shape) is torch.int16
    assert narrow_index_dtype(torch.zeros(1, dtype=torch.int32), nn.MaxPool2d(2), shape) is None
    assert narrow_index_dtype(torch.zeros(1, dtype=torch.int64), nn.AvgPool2d(2), shape) is None
    assert narrow_index_dtype(torch.zeros(1, dtype=torch.int64), nn.MaxPool2d(2), None) is None  # input unseen


def test_only_a_cast_straight_from_a_parameter_is_cast_again_in_backward():
    # Backward remakes the tensor as param.to(dtype): right for a cast of the parameter or a view of one,
    # wrong for anything else made from it in another dtype (a complex parameter's magnitude).
    param = nn.Parameter(torch.randn(4, 8))
    assert weight_cast_source(param.to(torch.bfloat16)) is param
    assert weight_cast_source(param.to(torch.bfloat16).t()) is param
    assert weight_cast_source(param.t().to(torch.bfloat16)) is None  # a cast of a view: other strides
    assert weight_cast_source(param * 2) is None
    complex_param = nn.Parameter(torch.randn(4, 8, dtype=torch.complex64))
    assert weight_cast_source(complex_param.abs()) is None


def _at_offset_1(shape: tuple, stride: tuple) -> torch.Tensor:
    """A bf16 tensor of no view base that starts one element into its storage (a slice would be a view)."""
    storage = torch.zeros(1 + shape[0] * shape[1], dtype=torch.bfloat16).untyped_storage()
    return torch.empty(0, dtype=torch.bfloat16).set_(storage, 1, shape, stride)


# What a frozen Linear(64, 32)'s layer might save, by case: its weight is [32, 64] float32, strides (64, 1).
_SAVED_BESIDE_A_FROZEN_WEIGHT = {
    "cast": (lambda w: w.to(torch.bfloat16), True),
    "view-of-cast": (lambda w: w.to(torch.bfloat16).t(), True),  # (its base is the cast)
    "same-dtype": (lambda w: w.clone(), False),
    "other-shape": (lambda w: torch.zeros(32, 65, dtype=torch.bfloat16), False),
    "other-strides": (lambda w: torch.empty_strided((32, 64), (1, 32), dtype=torch.bfloat16), False),
    "offset-in-storage": (lambda w: _at_offset_1((32, 64), (64, 1)), False),
}


@pytest.mark.parametrize("case", _SAVED_BESIDE_A_FROZEN_WEIGHT)
def test_a_frozen_weight_cast_is_told_by_dtype_shape_strides_and_a_storage_of_its_own(case):
    # Autocast's cast of a frozen weight has no autograd node to prove what it is; it is recognised by
    # looking like one of the saving module's frozen parameters in another dtype, and only then kept.
    layer = nn.Linear(64, 32).requires_grad_(False)
    make, expected = _SAVED_BESIDE_A_FROZEN_WEIGHT[case]
    assert is_frozen_weight_cast(make(layer.weight.detach()), layer) is expected


def test_a_cast_of_a_trainable_weight_or_outside_modules_is_no_frozen_weight_cast():
    layer = nn.Linear(64, 32)
    cast = layer.weight.detach().to(torch.bfloat16)
    assert not is_frozen_weight_cast(cast, layer)  # (a trainable weight's cast is told through autograd)
    layer.requires_grad_(False)
    assert is_frozen_weight_cast(cast, layer)
    assert not is_frozen_weight_cast(cast, None)


def test_a_parameter_is_recastable_unless_partitioned_or_inside_a_sharding_module(monkeypatch):
    # Backward casts a weight again only when the parameter will still hold the same values in the same
    # storage: not a DeepSpeed ZeRO-3 partition (marked by ds_id), not while FSDP's modules run.
    class Sharding(nn.Module):  # stands in for FSDP's module types, which need a process group to build
        pass

    monkeypatch.setattr(policy, "sharding_module_types", lambda: (Sharding,))
    param = nn.Parameter(torch.zeros(4))
    assert recastable(param, [nn.Linear(4, 4)])
    assert not recastable(param, [Sharding(), nn.Linear(4, 4)])
    param.ds_id = 7
    assert not recastable(param, [nn.Linear(4, 4)])


def test_cast_source_names_the_node_of_a_float_casts_source():
    a = torch.randn(4, 8, requires_grad=True)
    x = torch.tanh(a)
    node, output_nr = cast_source(x.to(torch.bfloat16))
    assert node is x.grad_fn and output_nr == 0
    assert cast_source(x) is None  # (made by tanh)
    assert cast_source(x.to(torch.bfloat16).view(8, 4)) is None  # (a view of a cast: not the cast itself)
    assert cast_source(x.to(torch.int32)) is None  # (an integer cast has no gradient)
    assert cast_source(a.detach().to(torch.bfloat16)) is None  # (no autograd node)
