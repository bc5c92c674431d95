"""Each aggregation rule on small hand-computed inputs (3-4 clients), and its limiting cases."""

import numpy as np
import pytest

from hpcfl import config
from hpcfl.algorithms import algorithm_class, available, build_algorithm
from hpcfl.algorithms.base import AFTER_TRAINING, project_to_simplex
from hpcfl.client.stats import STATISTICS
from hpcfl.algorithms.fedism import sharpness_weights
from hpcfl.algorithms.qfedavg import loss_power_weights, qffl_decision


def algo(name, rounds=10, **opts):
    sets = [f"algorithm.name={name}", f"run.rounds={rounds}"] + [f"algorithm.{k}={v!r}".replace("'", '"')
                                                                 for k, v in opts.items()]
    return build_algorithm(config.load(None, sets))


SIZES = np.array([100, 300, 600])


def test_registry_holds_the_eight_methods_and_the_config_lists_them():
    assert sorted(available()) == sorted(["fedavg", "afl", "qfedavg", "fairfed", "fedce", "fedga", "fedism",
                                          "fedism_plus"])
    assert config.AlgorithmConfig.__dataclass_fields__["name"].metadata["choices"] == tuple(available())


@pytest.mark.parametrize("name", available())
def test_every_statistic_a_method_asks_for_is_defined(name):
    a = algo(name, rounds=5)
    for t in range(5):
        assert set(a.stats_before(t)) <= set(STATISTICS), (name, t)


def random_stats(name, rng, n=4):
    """Every statistic the protocol can hand ``name``'s rule: registered ones, training results, its consensus ones."""
    stats = {k: rng.random(n) for k in (*STATISTICS, *AFTER_TRAINING)}
    stats.update({k: rng.uniform(-1, 1, n) for k in algorithm_class(name).consensus_stats})
    return stats


def test_fedavg_is_data_weighted():
    np.testing.assert_allclose(algo("fedavg").aggregate(0, SIZES, {}).weights, [0.1, 0.3, 0.6])


def test_qfedavg_as_coded_is_a_loss_power():
    losses = np.array([1.0, 2.0, 3.0])
    # q = 1: 1/6, 2/6, 3/6 (data sizes ignored)
    np.testing.assert_allclose(algo("qfedavg").aggregate(0, SIZES, {"loss": losses}).weights, [1 / 6, 2 / 6, 3 / 6])
    # q = 2: 1/14, 4/14, 9/14
    np.testing.assert_allclose(algo("qfedavg", q=2.0).aggregate(0, SIZES, {"loss": losses}).weights,
                               [1 / 14, 4 / 14, 9 / 14])
    np.testing.assert_allclose(loss_power_weights(losses, 0.0), [1 / 3] * 3)  # q = 0: uniform
    assert loss_power_weights(losses, 200.0)[2] == pytest.approx(1.0)  # large q: one-hot on the highest loss


def test_qffl_update_by_hand():
    # q = 1, L = 2: h_i = 1 * L^2 * ||w - w_i||^2 + L * L_i; b_i = L * L_i / sum h
    losses, sq = np.array([1.0, 2.0, 4.0]), np.array([0.5, 0.25, 0.0])
    h = 4 * sq + 2 * losses  # [4, 5, 8]
    d = qffl_decision(losses, sq, q=1.0, lipschitz=2.0)
    np.testing.assert_allclose(d.weights, 2 * losses / h.sum())  # [2, 4, 8] / 17
    assert d.keep == pytest.approx(1 - 14 / 17)
    d0 = qffl_decision(losses, sq, q=0.0, lipschitz=2.0)  # q = 0: uniform average, nothing kept
    np.testing.assert_allclose(d0.weights, [1 / 3] * 3)
    assert d0.keep == pytest.approx(0.0)
    # through the algorithm: L defaults to 1 / lr
    a = build_algorithm(config.load(None, ["algorithm.name=qfedavg", "algorithm.variant=qffl", "train.lr=0.5"]))
    np.testing.assert_allclose(a.aggregate(0, SIZES, {"loss": losses, "update_sq_norm": sq}).weights,
                               d.weights)


def test_afl_as_coded_is_one_hot_and_minimax_ascends_on_the_simplex():
    losses = np.array([0.5, 2.0, 1.0])
    np.testing.assert_array_equal(algo("afl").aggregate(0, SIZES, {"loss": losses}).weights, [0, 1, 0])
    a = algo("afl", variant="minimax", afl_lambda_lr=0.1)
    w0 = a.aggregate(0, SIZES, {"loss": losses}).weights
    # from uniform: 1/3 + 0.1 * [0.5, 2, 1] = [0.3833, 0.5333, 0.4333], projected: subtract (1.35 - 1) / 3
    np.testing.assert_allclose(w0, np.array([0.05, 0.2, 0.1]) + 1 / 3 - 0.35 / 3 + 0.0, atol=1e-12)
    w1 = a.aggregate(1, SIZES, {"loss": losses}).weights
    assert w1.sum() == pytest.approx(1) and w1[1] > w0[1] and w1[0] < w0[0]
    restored = algo("afl", variant="minimax", afl_lambda_lr=0.1)
    restored.load_state_dict(a.state_dict())
    np.testing.assert_allclose(restored.aggregate(2, SIZES, {"loss": losses}).weights,
                               a.aggregate(2, SIZES, {"loss": losses}).weights)


def test_simplex_projection():
    np.testing.assert_allclose(project_to_simplex(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])
    np.testing.assert_allclose(project_to_simplex(np.array([2.0, 0.0, 0.0])), [1, 0, 0])
    np.testing.assert_allclose(project_to_simplex(np.array([0.5, 0.5, 0.5])), [1 / 3] * 3)


def test_fairfed_as_coded_and_corrected_by_hand():
    acc = np.array([0.5, 0.8, 0.6])
    a = algo("fairfed", fairness_beta=1.0)
    np.testing.assert_allclose(a.aggregate(0, SIZES, {}).weights, [0.1, 0.3, 0.6])
    # as coded: gap_i = acc_i (1 - n_i/N) = [0.45, 0.56, 0.24], mean 0.4167
    gap = np.array([0.45, 0.56, 0.24])
    expected = np.maximum(np.array([0.1, 0.3, 0.6]) - (gap - gap.mean()), 0)
    np.testing.assert_allclose(a.aggregate(1, SIZES, {"bacc": acc}).weights, expected / expected.sum())
    # corrected: global = 0.05 + 0.24 + 0.36 = 0.65, gap = [0.15, 0.15, 0.05], mean 0.11667
    c = algo("fairfed", variant="corrected", fairness_beta=0.5)
    c.aggregate(0, SIZES, {})
    gap = np.array([0.15, 0.15, 0.05])
    expected = np.array([0.1, 0.3, 0.6]) - 0.5 * (gap - gap.mean())
    np.testing.assert_allclose(c.aggregate(1, SIZES, {"bacc": acc}).weights, expected / expected.sum())


def test_fedce_round_by_round():
    a = algo("fedce")
    cos0 = np.array([0.5, 0.0, -0.5])
    # t = 0: minus_val uniform; cw = 1 - cos = [0.5, 1, 1.5] / 3; new = cw * 1/3, normalised = cw
    w0 = a.aggregate(0, SIZES, {"cosine": cos0}).weights
    np.testing.assert_allclose(w0, [1 / 6, 2 / 6, 3 / 6])
    # t = 1: mean cos = [0.25, 0, -0.25] -> cw = [0.75, 1, 1.25] / 3
    #        mean mv = [0, 0, 0] and [0.5, 0.5, 0] -> 1 - [0.25, 0.25, 0] = [0.75, 0.75, 1] / 2.5
    w1 = a.aggregate(1, SIZES, {"cosine": np.zeros(3), "loo_bacc": np.array([0.5, 0.5, 0.0])}).weights
    cw = np.array([0.75, 1, 1.25]) / 3
    mv = np.array([0.75, 0.75, 1]) / 2.5
    new1 = cw * mv / (cw * mv).sum()
    np.testing.assert_allclose(w1, (np.array([1 / 6, 2 / 6, 3 / 6]) + new1) / 2)  # time average
    plus = algo("fedce", fedce_mode="plus")
    np.testing.assert_allclose(plus.aggregate(0, SIZES, {"cosine": cos0}).weights,
                               (np.array([1, 2, 3]) / 6 + 1 / 3) / 2)


def test_fedga_round_by_round():
    a = algo("fedga", rounds=10, fedga_step=0.05)
    np.testing.assert_allclose(a.aggregate(0, SIZES, {}).weights, [1 / 3] * 3)
    # t = 1: G = [0.3, 0.1, -0.1] - 0.1 = [0.2, 0, -0.2]; d_1 = 0.05 * 9 / 10 = 0.045
    stats = {"loss": np.array([1.3, 1.1, 0.9]), "loss_prev_local": np.ones(3)}
    w = np.array([1 / 3] * 3) + 0.045 / 3 * np.array([1.0, 0.0, -1.0])
    np.testing.assert_allclose(a.aggregate(1, SIZES, stats).weights, w / w.sum())
    zero_step = algo("fedga", fedga_step=0.0)  # step 0: stays uniform (FedAvg without data sizes)
    zero_step.aggregate(0, SIZES, {})
    np.testing.assert_allclose(zero_step.aggregate(1, SIZES, stats).weights, [1 / 3] * 3)


def test_fedga_clips_negatives_and_carries_the_clipped_vector():
    a = algo("fedga", rounds=2, fedga_step=30.0)
    a.aggregate(0, SIZES, {})
    w = a.aggregate(1, SIZES, {"loss": np.array([2.0, 1.0, 0.0]), "loss_prev_local": np.zeros(3)}).weights
    assert w[2] == 0 and w.sum() == pytest.approx(1)
    assert sum(a.state_dict()["prev"]) > 1  # clipped, not renormalised, as the reference carries it


def test_fedism_weights_ema_and_limits():
    s = np.array([0.01, 0.02, 0.03, 0.04])
    np.testing.assert_allclose(sharpness_weights(s, 2.0), np.array([1, 4, 9, 16]) / 30, rtol=1e-6)
    np.testing.assert_allclose(sharpness_weights(s, 0.0), [0.25] * 4)  # q = 0: uniform
    np.testing.assert_allclose(sharpness_weights(np.full(4, 0.3), 2.0), [0.25] * 4)  # equal sharpness: uniform
    assert sharpness_weights(s, 100.0)[3] == pytest.approx(1.0)  # large q: one-hot on the sharpest
    assert sharpness_weights(np.array([-1.0, 0.1]), 2.0)[0] < 1e-12  # negative sharpness clipped to ~0 weight
    a = algo("fedism", ema_beta=0.5)
    w0 = a.aggregate(0, SIZES[:1].repeat(4), {"sharpness": s}).weights
    np.testing.assert_allclose(w0, np.array([1, 4, 9, 16]) / 30, rtol=1e-6)
    w1 = a.aggregate(1, SIZES[:1].repeat(4), {"sharpness": s[::-1]}).weights
    np.testing.assert_allclose(w1, 0.5 * np.array([16, 9, 4, 1]) / 30 + 0.5 * w0, rtol=1e-6)


def test_fedism_plus_schedule():
    a = algo("fedism_plus", rounds=300, rho=0.05, rho_power=0.5)
    values = [a.rho(t) for t in (0, 9, 29, 74, 149, 224, 299)]
    np.testing.assert_allclose(values, [0.00289, 0.00913, 0.01581, 0.025, 0.03536, 0.0433, 0.05], atol=1e-5)
    assert algo("fedism", rho=0.05).rho(0) == 0.05


@pytest.mark.parametrize("name", available())
def test_every_weight_rule_stays_on_the_simplex(name):
    rng = np.random.default_rng(0)
    a = algo(name, rounds=5)
    sizes = rng.integers(10, 100, 4)
    for t in range(5):
        d = a.aggregate(t, sizes, random_stats(name, rng))
        assert (d.weights >= 0).all() and d.weights.sum() == pytest.approx(1) and d.keep == 0


def test_algorithms_import_neither_mpi_nor_torch():
    """Design invariant 6: the aggregation rules are plain NumPy, testable without MPI."""
    import subprocess
    import sys

    code = ("import sys, hpcfl.algorithms; "
            "print(sorted(m for m in ('mpi4py', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", available())
def test_state_is_plain_json_and_restores_exactly(name):
    """Cross-round state survives a JSON round trip (checkpoints): the restored rule continues identically."""
    import json

    rng = np.random.default_rng(1)
    sizes = rng.integers(10, 100, 4)
    rounds = [random_stats(name, rng) for _ in range(4)]
    a = algo(name, rounds=4)
    for t in range(2):
        a.aggregate(t, sizes, rounds[t])
    b = algo(name, rounds=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for t in (2, 3):
        np.testing.assert_array_equal(a.aggregate(t, sizes, rounds[t]).weights, b.aggregate(t, sizes, rounds[t]).weights)
