import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hpcfl.config import TrainConfig
from hpcfl.data.transforms import BatchTransform, random_affine_flip
from hpcfl.flat import FlatLayout
from hpcfl.client.losses import ABSENT_CLASS_LOG_PRIOR, log_prior, logit_adjusted_ce
from hpcfl.client.trainer import ClientData, batches, train_client
from hpcfl.models import build_model


def test_logit_adjusted_ce_matches_its_definition():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    counts = np.array([10, 30, 50, 10])
    expected = F.cross_entropy(logits + torch.log(torch.tensor(counts / 100.0)).float(), target)
    torch.testing.assert_close(logit_adjusted_ce(logits, target, log_prior(counts)), expected)
    # tau scales the adjustment; tau = 0 is plain CE
    torch.testing.assert_close(logit_adjusted_ce(logits, target, log_prior(counts), tau=0.0),
                               F.cross_entropy(logits, target))


def test_a_class_the_client_lacks_gives_finite_loss_and_gradients():
    counts = np.array([0, 5, 5])
    lp = log_prior(counts)
    assert lp[0] == ABSENT_CLASS_LOG_PRIOR and torch.isfinite(lp).all()
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = logit_adjusted_ce(logits, torch.tensor([1, 2]), lp)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert abs(float(logits.grad[:, 0].abs().max())) < 1e-10  # as with log(0): no push on the absent class


def test_batches_cover_everything_and_never_leave_a_single_sample():
    g = torch.Generator().manual_seed(0)
    for n, bs in [(10, 3), (33, 32), (64, 32), (1, 32), (5, 5)]:
        parts = batches(n, bs, g)
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        assert all(len(p) > 1 for p in parts) or n == 1


def test_augmentation_is_a_function_of_the_generator():
    x = torch.rand(8, 1, 16, 16)
    a = random_affine_flip(x, torch.Generator().manual_seed(3))
    b = random_affine_flip(x, torch.Generator().manual_seed(3))
    c = random_affine_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmentation_limits_reduce_to_identity_and_flip():
    x = torch.rand(4, 3, 12, 10)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_affine_flip(x, g, degrees=0, translate=0, flip_p=0.0), x)
    assert torch.equal(random_affine_flip(x, g, degrees=0, translate=0, flip_p=1.0), x.flip(-1))


def test_broadcast_affine_grid_matches_torch_affine_grid():
    import torch.nn.functional as F

    from hpcfl.data.transforms import affine_grid

    theta = torch.randn(16, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.2 + torch.eye(2, 3)
    for h, w in ((7, 7), (40, 48), (224, 224)):
        ref = F.affine_grid(theta, [16, 1, h, w], align_corners=False)
        torch.testing.assert_close(affine_grid(theta, h, w), ref, rtol=0, atol=1e-6)
        x = torch.rand(16, 1, h, w)
        same = F.grid_sample(x, affine_grid(theta, h, w), mode="nearest", align_corners=False) == \
            F.grid_sample(x, ref, mode="nearest", align_corners=False)
        assert same.float().mean() > 0.999  # nearest neighbours differ only where a coordinate sits on a tie


def test_augmentation_translation_is_whole_pixels():
    # with translate large enough, a shifted image equals a rolled one inside the valid region
    x = torch.rand(64, 1, 20, 20)
    y = random_affine_flip(x, torch.Generator().manual_seed(1), degrees=0, translate=0.1, flip_p=0.0)
    for i in range(64):
        found = False
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                shifted = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
                inner = (slice(None), slice(2, -2), slice(2, -2))
                if torch.equal(shifted[inner], y[i][inner]):
                    found = True
        assert found, f"sample {i} is not an integer shift"


def test_batch_transform_normalises_and_replicates_gray():
    imgs = torch.full((2, 4, 4, 1), 255, dtype=torch.uint8)
    out = BatchTransform(3)(imgs)
    assert out.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(out[0, :, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="cannot feed 3-channel"):
        BatchTransform(1)(torch.zeros(1, 4, 4, 3, dtype=torch.uint8))


def _client(n=40, size=8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = (rng.random((n, size, size, 1)) * 60 + labels[:, None, None, None] * 60).astype(np.uint8)
    return ClientData(0, torch.from_numpy(images), torch.from_numpy(labels), np.bincount(labels, minlength=3))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_local_training_is_deterministic_and_learns(optimizer):
    data = _client()
    cfg = TrainConfig(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, batch_size=8, local_epochs=5)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("cnn", 3, 1, width=4)
        loss, steps = train_client(model, data, cfg, BatchTransform(1), torch.Generator().manual_seed(1))
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
        assert steps == 5 * math.ceil(40 / 8) and math.isfinite(loss)
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    # and it learns this easy task: the last epoch's loss is below the initial ~log(3)
    torch.manual_seed(0)
    model = build_model("cnn", 3, 1, width=4)
    cfg_more = TrainConfig(optimizer=optimizer, lr=cfg.lr, batch_size=8, local_epochs=15, augment=False)
    loss, _ = train_client(model, data, cfg_more, BatchTransform(1), torch.Generator().manual_seed(1))
    assert loss < 0.9 * math.log(3)


def _train_once(cfg, model_fn, transform, local_optimizer="plain"):
    torch.manual_seed(0)
    base = build_model("cnn", 3, 1, width=4, cnn_norm="batch")
    model = model_fn(base)
    loss, steps = train_client(model, _client(), cfg, transform, torch.Generator().manual_seed(1), local_optimizer,
                               0.05)
    return base, loss, steps


def test_compiled_model_trains_like_the_eager_one_with_gsam():
    # protocol.py hands train_client torch.compile(model) when train.compile is set; the aot_eager backend runs
    # the same tracing (dynamo + autograd graphs, BatchNorm momentum switched between GSAM's passes) without a
    # C++ compiler, so the check stays seconds long
    cfg = TrainConfig(lr=0.01, batch_size=8, local_epochs=2)
    eager, loss_e, steps_e = _train_once(cfg, lambda m: m, BatchTransform(1), "gsam")
    compiled, loss_c, steps_c = _train_once(cfg, lambda m: torch.compile(m, backend="aot_eager"), BatchTransform(1),
                                            "gsam")
    assert steps_c == steps_e == 10
    assert loss_c == pytest.approx(loss_e, rel=1e-4)
    layout = FlatLayout(eager)
    np.testing.assert_allclose(layout.to_vector(compiled), layout.to_vector(eager), rtol=1e-4, atol=1e-5)


def test_bf16_autocast_and_channels_last_train_close_to_float32():
    cfg = TrainConfig(lr=0.01, batch_size=8, local_epochs=2)
    ref, loss_ref, _ = _train_once(cfg, lambda m: m, BatchTransform(1))
    last, loss_last, _ = _train_once(dataclasses.replace(cfg, channels_last=True),
                                     lambda m: m.to(memory_format=torch.channels_last),
                                     BatchTransform(1, channels_last=True))
    assert BatchTransform(1, channels_last=True)(_client().images[:2]).is_contiguous(
        memory_format=torch.channels_last)
    layout = FlatLayout(ref)  # the flat vector is in logical order whatever the memory format
    np.testing.assert_allclose(layout.to_vector(last), layout.to_vector(ref), rtol=1e-3, atol=1e-4)
    assert loss_last == pytest.approx(loss_ref, rel=1e-4)
    bf16, loss_bf16, _ = _train_once(dataclasses.replace(cfg, amp="bf16"), lambda m: m, BatchTransform(1))
    assert np.isfinite(loss_bf16) and loss_bf16 != loss_ref  # autocast really ran in bf16 ...
    assert loss_bf16 == pytest.approx(loss_ref, rel=0.05)  # ... and still trains the same model
