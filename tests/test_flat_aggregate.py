import itertools

import numpy as np
import pytest
import torch

from hpcfl.aggregate import add_fixed_point, fixed_point_exponent, fixed_point_to_float64
from hpcfl.flat import FlatLayout
from hpcfl.models import build_model


def test_layout_round_trip_and_integer_buffers():
    torch.manual_seed(0)
    model = build_model("cnn", 5, 1, width=4, cnn_norm="batch")  # BatchNorm: float and integer buffers
    layout = FlatLayout(model)
    n_float = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert layout.size == n_float
    assert layout.int_buffers and all(n.endswith("num_batches_tracked") for n in layout.int_buffers)
    assert layout.param_mask.sum() == sum(p.numel() for p in model.parameters())

    vec = layout.to_vector(model)
    assert vec.dtype == np.float32
    other = build_model("cnn", 5, 1, width=4, cnn_norm="batch")
    for name in layout.int_buffers:
        other.state_dict()[name].fill_(7)
    layout.load_vector(other, vec)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        if a.is_floating_point():
            assert torch.equal(a, b), name
        else:
            assert int(b) == 0, f"{name}: integer buffers are reset, never averaged"
    np.testing.assert_array_equal(layout.to_vector(other), vec)


def test_layout_refuses_wrong_length():
    model = build_model("cnn", 5, 1, width=4)
    with pytest.raises(ValueError, match="does not match"):
        FlatLayout(model).load_vector(model, np.zeros(3, np.float32))


def _fixed_sum(groups, weights, vecs, exponent):
    """Sum per group (as client ranks do), then sum the group partials (as MPI's Reduce does)."""
    total = np.zeros(vecs.shape[1], np.int64)
    for g in groups:
        acc = np.zeros(vecs.shape[1], np.int64)
        for c in g:
            add_fixed_point(acc, weights[c], vecs[c], exponent)
        total += acc
    return fixed_point_to_float64(total, exponent).astype(np.float32)


def test_fixed_point_sum_does_not_depend_on_grouping():
    rng = np.random.default_rng(1)
    n, p = 7, 5000
    vecs = (rng.standard_normal((n, p)) * rng.choice([1e-6, 1e-2, 1.0, 30.0], size=(n, p))).astype(np.float32)
    weights = rng.dirichlet(np.ones(n))
    e = fixed_point_exponent(float(np.abs(vecs).max()), n)
    one = _fixed_sum([list(range(n))], weights, vecs, e)
    for groups in ([[0, 1, 2], [3, 4, 5, 6]], [[6], [0, 5], [1, 2, 3, 4]], [[c] for c in range(n)]):
        np.testing.assert_array_equal(_fixed_sum(groups, weights, vecs, e), one)
    exact = (weights[:, None] * vecs.astype(np.float64)).sum(0)
    np.testing.assert_allclose(one, exact, rtol=1e-6, atol=1e-9)
    # the plain float32 sum does depend on grouping (this is why the fixed point exists)
    f32 = [sum((np.float32(weights[c]) * vecs[c] for c in order), np.zeros(p, np.float32))
           for order in itertools.islice(itertools.permutations(range(n)), 0, 50, 7)]
    assert any((a != f32[0]).any() for a in f32[1:])


def test_fixed_point_never_overflows_at_the_edge():
    n = 20
    vecs = np.full((n, 3), 3.0e38, np.float32)
    vecs[:, 1] *= -1
    vecs[:, 2] = 1e-30
    weights = np.full(n, 1.0 / n)
    e = fixed_point_exponent(float(np.abs(vecs).max()), n)
    out = _fixed_sum([list(range(n))], weights, vecs, e)
    np.testing.assert_allclose(out[:2], [3.0e38, -3.0e38], rtol=1e-6)


def test_non_finite_models_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        fixed_point_exponent(float("nan"), 3)
    assert fixed_point_exponent(0.0, 3) == 0
