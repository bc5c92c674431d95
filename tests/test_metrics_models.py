import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from hpcfl.data.transforms import BatchTransform
from hpcfl.metrics import classification_metrics, predict_proba
from hpcfl.models import build_model, input_channels


def test_metrics_against_direct_sklearn_and_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.1, .1, .8], [.5, .2, .3],
                      [.2, .2, .6]], dtype=np.float32)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)  # [0, 1, 1, 1, 2, 0, 2]
    assert m["acc"] == pytest.approx(5 / 7)
    assert m["bacc"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert m["bacc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs.astype(np.float64), multi_class="ovo"))
    assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"))
    assert m["auc_weighted"] == pytest.approx(roc_auc_score(y, probs.astype(np.float64), multi_class="ovr",
                                                            average="weighted"))
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert list(m)[:4] == ["bacc", "auc", "acc", "f1"]


def test_gaps_and_client_summary():
    from hpcfl.metrics import client_summary, gaps

    res = {"clean": {"bacc": 0.8, "auc": 0.9, "acc": 0.85, "f1": 0.7},
           "gaussian_3": {"bacc": 0.5, "auc": 0.7, "acc": 0.6, "f1": 0.4}}
    assert gaps(res) == {"gaussian_3": pytest.approx({"bacc": 0.3, "auc": 0.2, "acc": 0.25, "f1": 0.3})}
    s = client_summary(np.array([0.9, 0.7, 0.4, 0.2]), corrupted=[2, 3])
    assert s["worst"] == 0.2 and s["clean_mean"] == pytest.approx(0.8) and s["corrupted_mean"] == pytest.approx(0.3)
    assert s["std"] == pytest.approx(np.std([0.9, 0.7, 0.4, 0.2]))


def test_auc_is_nan_when_a_class_is_missing_from_the_test_set():
    m = classification_metrics(np.array([0, 1, 0]), np.array([[.9, .05, .05], [.1, .8, .1], [.4, .3, .3]]))
    assert np.isnan(m["auc"]) and np.isnan(m["auc_weighted"]) and m["acc"] == 1.0


@pytest.mark.parametrize("name", ["cnn", "resnet18", "densenet121", "efficientnet_b0"])
def test_every_model_builds_with_our_head_and_runs_at_32px(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, data_channels=1, width=8)
    probs = predict_proba(model, torch.zeros(3, 32, 32, 1, dtype=torch.uint8), BatchTransform(input_channels(name, 1)),
                          batch_size=2)
    assert probs.shape == (3, 5)
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_pretrained_weights_come_from_a_local_file_only(tmp_path):
    torch.manual_seed(1)
    import torchvision

    donor = torchvision.models.resnet18(weights=None)  # stands in for an ImageNet checkpoint on disk
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    model = build_model("resnet18", 5, 3, pretrained_path=str(path))
    assert torch.equal(model.conv1.weight, donor.conv1.weight)
    assert model.fc.out_features == 5
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model("resnet18", 5, 3, pretrained_path=str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="does not match resnet18"):
        build_model("resnet18", 5, 3, pretrained_path=str(tmp_path / "foreign.pth"))
    with pytest.raises(ValueError, match="does not match cnn"):
        build_model("cnn", 5, 1, pretrained_path=str(path))


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_own_models_take_every_pretrained_weight_but_the_head(tmp_path, name):
    torch.manual_seed(0)
    donor = build_model(name, 7, 1, 8)  # another number of classes: its head cannot be reused anyway
    torch.save(donor.state_dict(), tmp_path / "start.pt")
    torch.manual_seed(1)
    model = build_model(name, 5, 1, 8, pretrained_path=str(tmp_path / "start.pt"))
    for key, value in model.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] == 5
        else:
            assert torch.equal(value, donor.state_dict()[key]), key



def test_small_cnn_normalisation_is_chosen_by_cnn_norm():
    from torch import nn

    group = build_model("cnn", 5, 1, width=16)  # the default: GroupNorm, no running statistics to average
    batch = build_model("cnn", 5, 1, width=16, cnn_norm="batch")
    assert [m.num_groups for m in group.modules() if isinstance(m, nn.GroupNorm)] == [8, 8, 8]
    assert not list(group.buffers())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules()) == 3
    assert group(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="cnn_norm"):
        build_model("cnn", 5, 1, cnn_norm="layer")


@pytest.mark.parametrize("shape", [(4, 8, 16, 16), (3, 5, 7, 9), (2, 1, 6, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_last_max_pooling_is_max_pool_2d_bit_for_bit(shape, channels_last):
    """MaxPool2x2 (hpcfl/models/nets.py) gives nn.MaxPool2d(2)'s values and gradients, odd sizes included, on ReLU
    outputs (whose ties at zero must not move a gradient)."""
    from hpcfl.models.nets import MaxPool2x2

    torch.manual_seed(0)
    x = torch.relu(torch.randn(shape))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = torch.nn.MaxPool2d(2)(a), MaxPool2x2()(b)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
    assert yb.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_multi_tensor_optimizer_steps_equal_the_per_tensor_loop(optimizer):
    """make_optimizer uses PyTorch's foreach kernels: the same numbers as the per-tensor loop, step after step."""
    from hpcfl.client.trainer import make_optimizer
    from hpcfl.config import TrainConfig

    cfg = TrainConfig(optimizer=optimizer)
    models = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = build_model("cnn", 5, 1, 8)
        opt = make_optimizer(model.parameters(), cfg)
        if not foreach:  # the same optimizer, with the per-tensor loop
            opt = type(opt)(model.parameters(), **{**opt.defaults, "foreach": False})
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(8, 1, 16, 16, generator=gen)
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
