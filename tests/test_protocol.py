"""The round protocol's phases, one by one, in this process with the single-process comm; and two methods that
theory says must agree, run end to end through ``protocol.run``."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hpcfl import config, protocol
from hpcfl.comm import SingleProcessComm
from hpcfl.federation import setup_federation
from hpcfl.rundir import FRESH, Opening
from hpcfl.supervise import Where
from tests.conftest import TINY, final_vector, read_metrics


def tiny_config(data_cache, *extra):
    return config.load(None, [*TINY, f"data.cache_dir={data_cache}", *extra])


@pytest.fixture(scope="module")
def fedism(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("phases")
    cfg = tiny_config(data_cache, "algorithm.name=fedism", "data.val_fraction=0.2")
    fed = setup_federation(cfg, SingleProcessComm(), out, Where())
    state, start, lines = protocol.start_state(fed, Opening(FRESH))
    return fed, state


def test_client_table_names_columns_and_sums_exactly():
    table = protocol.ClientTable(3, ("a", "b"))
    table[1] = (2.0, np.nan)
    assert table["a"].tolist() == [0.0, 2.0, 0.0] and table.finite(0) and not table.finite(1)
    assert list(table.sum_to_server(SingleProcessComm()).as_dict()) == ["a", "b"]


def test_setup_holds_every_client_on_the_one_rank(fedism):
    fed, state = fedism
    assert fed.my_clients == list(range(20)) and set(fed.test_sets) == {"clean", "gaussian_2"}
    assert fed.corrupted == [16, 17, 18, 19] and fed.local_optimizer == "gsam"
    assert state.global_vec.shape == (fed.layout.size,) and np.allclose(state.prev_weights, 1 / 20)


def test_one_round_phase_by_phase(fedism):
    fed, s = fedism
    w0 = s.global_vec.copy()
    protocol.start_round(fed, s, 0, None)
    assert s.rho == pytest.approx(0.05) and fed.where.round == 0

    protocol.measure_statistics(fed, s)
    assert set(s.stats) == {"sharpness"} and (s.stats["sharpness"] > 0).all()
    np.testing.assert_array_equal(s.global_vec, w0)  # measuring leaves w^t as it was

    protocol.train_clients(fed, s)
    assert sorted(s.trained) == list(range(20)) and not s.bad_here
    assert (s.training["steps"] > 0).all() and (s.training["update_sq_norm"] > 0).all()
    assert set(s.stats) == {"sharpness", "train_loss", "steps", "update_sq_norm"}

    protocol.exchange_consensus(fed, s)  # FedISM asks for none
    assert "cosine" not in s.stats

    protocol.decide_weights(fed, s)
    from hpcfl.algorithms.fedism import sharpness_weights
    np.testing.assert_allclose(s.weights, sharpness_weights(s.stats["sharpness"], 2.0), rtol=1e-12)

    trained = dict(s.trained)
    protocol.aggregate(fed, s)
    direct = sum(s.weights[c] * trained[c].astype(np.float64) for c in trained)
    np.testing.assert_allclose(s.global_vec, direct, rtol=1e-6, atol=1e-7)  # fixed point vs float64 sum
    assert not s.trained and s.prev_weights is not s.weights


def test_an_evaluated_round_writes_a_metrics_line(fedism, tmp_path):
    fed, s = fedism
    record = protocol.ServerRecord(fed, [], 0)
    protocol.evaluate(fed, s, record, 0.0)  # round 0 of 3, eval.every = 1: evaluated, alone at once
    line, = record.runlog.lines
    assert line["round"] == 0 and set(line["metrics"]) == {"clean", "gaussian_2"}
    assert len(line["clients"]["bacc"]) == 20 and "sharpness" in line["stats"]


def _run(out, data_cache, *extra):
    logging.getLogger("hpcfl").handlers.clear()
    cfg = tiny_config(data_cache, *extra)
    assert protocol.run(cfg, SingleProcessComm(), out, Where()) == {}
    logging.getLogger("hpcfl").handlers.clear()
    return read_metrics(out), final_vector(out)


def test_qffl_with_q_0_is_a_uniform_average_end_to_end(tmp_path, data_cache):
    """q-FFL's update with q = 0 keeps nothing of w^t and weighs every client 1/N: the model average that
    q-FedAvg's loss power gives with q = 0 (and FedGA with step 0). One round, through protocol.run (a model one ulp away trains, in the next round, to one up to Adam's step
    away in parameters with vanishing gradients: agreement after more rounds is not to rounding)."""
    one = "run.rounds=1"
    uniform, w_uniform = _run(tmp_path / "uniform", data_cache, one, "algorithm.name=qfedavg", "algorithm.q=0.0")
    qffl, w_qffl = _run(tmp_path / "qffl", data_cache, one, "algorithm.name=qfedavg", "algorithm.variant=qffl",
                        "algorithm.q=0.0")
    fedga, w_fedga = _run(tmp_path / "fedga", data_cache, one, "algorithm.name=fedga", "algorithm.fedga_step=0.0")
    assert len(uniform) == len(qffl) == len(fedga) == 1
    for a, b, c in zip(uniform, qffl, fedga):
        np.testing.assert_allclose(a["weights"], 1 / 20, rtol=1e-14)
        np.testing.assert_allclose(b["weights"], a["weights"], rtol=1e-14)
        np.testing.assert_allclose(c["weights"], a["weights"], rtol=1e-14)
        assert abs(b["keep"]) < 1e-14 and a["keep"] == 0
    # the weights agree to the last bits of float64, so the models to float32 rounding
    np.testing.assert_allclose(w_qffl, w_uniform, rtol=2e-7, atol=1e-9)
    np.testing.assert_allclose(w_fedga, w_uniform, rtol=2e-7, atol=1e-9)
