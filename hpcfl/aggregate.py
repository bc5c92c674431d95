"""Weighted model sums whose result does not depend on how clients are grouped onto ranks.

Floating-point addition is not associative: summing a_i·w_i over clients as (rank 1's partial) + (rank 2's
partial) rounds differently from one sequential sum, and training amplifies those last-bit differences. So
hpcfl sums in fixed point: every term a_i·w_i is computed in float64, scaled by a power of two 2^s and rounded
to int64; integer addition is exact and associative, so any grouping (one rank or many, any MPI reduction tree)
gives the same integers. The scale is chosen per round from the largest term |a_i·w_i| and the number of
terms so that the sum cannot overflow: the resolution is about 2^-(61 - log2 N) times the largest entry
(2^-56 of it for N = 20), far below float32's precision of the result.

``aggregation = "float32"`` instead sums in float32 (half the bytes on the wire, results equal across world
sizes only to the last bits).
"""

from __future__ import annotations

import math

import numpy as np

_HEADROOM_BITS = 61  # int64 holds |x| < 2^63; keep a bit for rounding


def fixed_point_exponent(max_abs: float, num_terms: int) -> int:
    """The exponent s such that the sum of ``num_terms`` terms each below ``max_abs`` fits int64 after
    scaling by 2^s."""
    if not math.isfinite(max_abs):
        raise ValueError(f"cannot aggregate non-finite values (max |w| = {max_abs})")
    if max_abs == 0.0:
        return 0
    return _HEADROOM_BITS - math.frexp(max_abs)[1] - max(1, math.ceil(math.log2(num_terms + 1)))


def add_fixed_point(acc: np.ndarray, weight: float, vec: np.ndarray, exponent: int) -> None:
    """acc += round(weight * vec * 2^exponent), acc being int64."""
    term = np.multiply(vec, np.float64(weight), dtype=np.float64)
    np.ldexp(term, exponent, out=term)
    np.rint(term, out=term)
    acc += term.astype(np.int64)


def fixed_point_to_float64(acc: np.ndarray, exponent: int) -> np.ndarray:
    """acc * 2^-exponent as float64 (the caller rounds once more, to the model's float32)."""
    return np.ldexp(acc.astype(np.float64), -exponent)
