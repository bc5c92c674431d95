"""SAM/GSAM steps against closed forms, BatchNorm bookkeeping, and the client sharpness statistic."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcfl.data.transforms import BatchTransform
from hpcfl.flat import FlatLayout
from hpcfl.client.sam import sam_step
from hpcfl.client.stats import StatsContext, measure
from hpcfl.client.trainer import ClientData
from hpcfl.models import build_model


class Quadratic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


A = np.array([[3.0, 0.5], [0.5, 1.0]])


def quad_loss(m):
    return 0.5 * m.w @ torch.tensor(A) @ m.w


@pytest.mark.parametrize("alpha", [None, 0.0, 0.1, 0.7])
def test_sam_and_gsam_step_match_the_closed_form_on_a_quadratic(alpha):
    w, rho, lr = np.array([1.0, -2.0]), 0.3, 0.1
    m = Quadratic(w)
    loss = sam_step(m, quad_loss, torch.optim.SGD(m.parameters(), lr=lr), rho, alpha)
    g = A @ w
    eps = rho * g / (np.linalg.norm(g) + 1e-12)
    gp = A @ (w + eps)
    if alpha is None:
        d = gp
    else:
        cos = g @ gp / (np.linalg.norm(g) * np.linalg.norm(gp) + 1e-12)
        d = gp - alpha * (g - cos * np.linalg.norm(g) * gp / (np.linalg.norm(gp) + 1e-12))
    np.testing.assert_allclose(m.w.detach().numpy(), w - lr * d, rtol=1e-12)
    assert float(loss) == pytest.approx(0.5 * w @ A @ w)  # the loss reported is the one at w


def test_gsam_with_alpha_zero_is_sam():
    a, b = Quadratic([0.3, 0.7]), Quadratic([0.3, 0.7])
    sam_step(a, quad_loss, torch.optim.Adam(a.parameters(), lr=0.01), 0.05, None)
    sam_step(b, quad_loss, torch.optim.Adam(b.parameters(), lr=0.01), 0.05, 0.0)
    assert torch.equal(a.w, b.w)


def test_second_pass_leaves_batchnorm_running_statistics_as_one_plain_forward():
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    sam_model = build_model("cnn", 3, 1, width=4, cnn_norm="batch")
    plain = build_model("cnn", 3, 1, width=4, cnn_norm="batch")
    plain.load_state_dict(sam_model.state_dict())
    assert sum("running" in name for name, _ in sam_model.named_buffers()) == 6
    sam_model.train(), plain.train()
    sam_step(sam_model, lambda m: F.cross_entropy(m(x), y), torch.optim.SGD(sam_model.parameters(), lr=0.0), 0.5, 0.1)
    with torch.no_grad():
        plain(x)
    for (name, a), b in zip(sam_model.named_buffers(), plain.buffers()):
        if "running" in name:
            torch.testing.assert_close(a, b, msg=name)
    assert all(m.momentum == 0.1 for m in sam_model.modules() if isinstance(m, nn.BatchNorm2d))  # restored


def test_weights_are_restored_exactly_before_the_base_step():
    m = Quadratic([0.123456789, -9.87654321])
    before = m.w.detach().clone()
    sam_step(m, quad_loss, torch.optim.SGD(m.parameters(), lr=0.0), 0.7, 0.1)  # lr 0: only the restore
    assert torch.equal(m.w, before)


def _ctx(rho, generator=None, n=24):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)
    data = ClientData(0, torch.from_numpy(images), torch.from_numpy(labels), np.bincount(labels, minlength=3))
    model = build_model("cnn", 3, 1, width=4)
    layout = FlatLayout(model)
    return StatsContext(model, layout, data, BatchTransform(1), layout.to_vector(model), generator, 10, rho)


def test_sharpness_is_the_loss_rise_along_the_normalised_full_gradient():
    ctx = _ctx(rho=0.05)
    s, loss = measure(("sharpness", "loss"), ctx)
    np.testing.assert_array_equal(ctx.layout.to_vector(ctx.model), ctx.global_vec)  # left holding w^t
    # an independent computation, with the whole shard in one batch
    model = ctx.model
    layout = ctx.layout
    layout.load_vector(model, ctx.global_vec)
    model.eval()
    x, y = ctx.transform(ctx.data.images), ctx.data.labels
    l0 = F.cross_entropy(model(x), y)
    l0_value = float(l0.detach())
    grads = torch.autograd.grad(l0, list(model.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p.add_(0.05 * g / norm)
        l1 = F.cross_entropy(model(x), y)
    assert loss == pytest.approx(l0_value, rel=1e-5)
    assert s == pytest.approx(float(l1) - l0_value, rel=1e-3, abs=1e-7)
    # first order for a small radius: S ~ rho * ||grad of the mean loss||
    small = _ctx(rho=1e-4)
    assert measure(("sharpness",), small)[0] == pytest.approx(1e-4 * float(norm), rel=0.05)


def test_statistics_on_augmented_data_follow_the_generator():
    a = measure(("loss",), _ctx(0.05, torch.Generator().manual_seed(1)))
    b = measure(("loss",), _ctx(0.05, torch.Generator().manual_seed(1)))
    c = measure(("loss",), _ctx(0.05, torch.Generator().manual_seed(2)))
    assert a == b and a != c


def test_leave_one_out_model_and_previous_local_model():
    ctx = _ctx(0.05)
    other = build_model("cnn", 3, 1, width=4)
    ctx.prev_local = ctx.layout.to_vector(other)
    ctx.prev_weight = 0.25
    loo_bacc, prev_loss = measure(("loo_bacc", "loss_prev_local"), ctx)
    # by hand: (w - c w_prev) / (1 - c)
    loo = (ctx.global_vec.astype(np.float64) - 0.25 * ctx.prev_local) / 0.75
    check = _ctx(0.05)
    check.global_vec = loo.astype(np.float32)
    assert loo_bacc == measure(("bacc",), check)[0]
    check.global_vec = ctx.prev_local
    assert prev_loss == measure(("loss",), check)[0]
    with pytest.raises(ValueError, match="unknown client statistic"):
        measure(("nope",), ctx)
