import numpy as np
import pytest

from hpcfl.comm import SingleProcessComm, assign_clients
from hpcfl.federation import split_rows


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 5, 20])
def test_assignment_covers_every_client_once_and_balances(num_ranks):
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 2000, size=20)
    groups = assign_clients(sizes, num_ranks)
    assert len(groups) == num_ranks
    assert sorted(c for g in groups for c in g) == list(range(20))
    assert all(g == sorted(g) and g for g in groups)
    loads = [sizes[g].sum() for g in groups]
    # greedy LPT: no rank exceeds the mean load by more than the largest client
    assert max(loads) <= sizes.sum() / num_ranks + sizes.max()
    assert assign_clients(list(sizes), num_ranks) == groups  # deterministic, any sequence type


def test_assignment_balances_samples_not_counts():
    groups = assign_clients([1000, 10, 10, 10, 10], 2)
    assert groups == [[0], [1, 2, 3, 4]]


def test_more_client_ranks_than_clients_is_refused_with_advice():
    with pytest.raises(ValueError, match="5 client ranks but only 4 clients.*at most 5 ranks"):
        assign_clients([1, 2, 3, 4], 5)


def test_local_comm_is_the_identity_and_hosts_everything():
    comm = SingleProcessComm()
    assert comm.is_server and comm.size == 1 and comm.my_clients([3, 1, 2]) == [0, 1, 2]
    buf = np.arange(4.0)
    assert comm.bcast(buf) is buf
    recv = np.zeros(4)
    comm.reduce_sum(buf, recv)
    np.testing.assert_array_equal(recv, buf)
    assert comm.reduce_sum(buf, buf) is buf


@pytest.mark.parametrize("n,batch,parts", [(150, 32, 2), (150, 32, 5), (150, 256, 2), (1000, 256, 4), (7, 1, 3),
                                           (0, 8, 2), (513, 64, 8)])
def test_test_set_shares_cover_every_row_once_cut_at_batch_boundaries(n, batch, parts):
    """eval.placement 'clients': each client rank's share of a test set starts at a multiple of the evaluation
    batch size, so its batches are batches of the whole set (the server's predictions, bit for bit)."""
    rows = split_rows(n, batch, parts)
    assert len(rows) == parts and sum(rows) == n and min(rows) >= 0
    starts = np.cumsum([0, *rows])[:-1]
    assert all(start % batch == 0 for start, r in zip(starts, rows) if r)
    batches = -(-n // batch)
    assert max(rows) <= -(-batches // parts) * batch  # balanced: no share more than its part of the batches
