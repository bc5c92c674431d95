"""preprocess.corrupt: the reference's Gaussian-noise formula, per-image determinism, argument checks."""

import numpy as np
import pytest

from preprocess.corrupt import CORRUPTIONS, GAUSSIAN_SIGMAS, corrupt, gaussian_noise, stable_int


def random_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_sigmas():
    assert GAUSSIAN_SIGMAS == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert "gaussian" in CORRUPTIONS


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_matches_the_reference_formula(severity):
    images = random_images((4, 16, 16, 3))
    out = gaussian_noise(images, severity, np.random.default_rng(42))

    # Direct computation with the same stream, written independently: floor == truncation for values >= 0.
    noise = np.random.default_rng(42).normal(0.0, GAUSSIAN_SIGMAS[severity - 1], images.shape)
    exact = np.clip(images / 255.0 + noise, 0.0, 1.0) * 255.0
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out, np.floor(exact).astype(np.uint8))
    # The check is meaningful: rounding would differ on many pixels, and both clips are hit.
    assert np.any(np.rint(exact) != np.floor(exact))
    assert np.any(out == 0) and np.any(out == 255)


def test_clipping_at_both_ends_without_wraparound():
    black, white = np.zeros((1, 32, 32, 1), np.uint8), np.full((1, 32, 32, 1), 255, np.uint8)
    out_black = gaussian_noise(black, 5, np.random.default_rng(0))
    out_white = gaussian_noise(white, 5, np.random.default_rng(0))
    noise = np.random.default_rng(0).normal(0.0, 0.38, black.shape)
    # Negative noise on black clips to 0, positive noise on white clips to exactly 255 (no uint8 overflow).
    assert np.all(out_black[noise <= 0] == 0) and np.all(out_black[noise > 0.01] > 0)
    assert np.all(out_white[noise >= 0] == 255) and np.all(out_white[noise < -0.01] < 255)


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_noise_level_per_severity(severity):
    grey = np.full((64, 64, 1), 128, np.uint8)  # mid-grey: clipping is negligible up to severity 3
    out = gaussian_noise(grey, severity, np.random.default_rng(severity))
    std = (out.astype(float) / 255.0).std()
    assert abs(std - GAUSSIAN_SIGMAS[severity - 1]) < 0.05 * GAUSSIAN_SIGMAS[severity - 1]


def test_noise_is_drawn_per_channel():
    grey = np.repeat(random_images((8, 8, 1)), 3, axis=-1)
    out = gaussian_noise(grey, 2, np.random.default_rng(0))
    assert not np.array_equal(out[..., 0], out[..., 1])


def test_stable_int_is_process_independent():
    # A fixed value (BLAKE2b), so every MPI rank and every later run agrees; Python's hash() would not.
    assert stable_int("ID_0a1b2c3d4") == 12469621278816140041
    assert stable_int(b"ID_0a1b2c3d4") == stable_int("ID_0a1b2c3d4")
    assert stable_int(17) == 17 and stable_int(np.int64(17)) == 17
    with pytest.raises(ValueError):
        stable_int(-1)
    with pytest.raises(TypeError):
        stable_int(1.5)


@pytest.mark.parametrize("ids", [[3, 10, 11, 500, 7, 8], ["a", "b", "c", "ID_1", "ID_2", "ID_3"]])
def test_corrupt_is_deterministic_per_image_id(ids):
    images = random_images((6, 16, 16, 1), seed=1)
    out = corrupt(images, "gaussian", 3, seed=9, ids_or_indices=ids)
    np.testing.assert_array_equal(out, corrupt(images, "gaussian", 3, seed=9, ids_or_indices=ids))
    # Image j is exactly gaussian_noise on its own stream [seed, stable_int(id_j)].
    for j, image_id in enumerate(ids):
        rng = np.random.default_rng([9, stable_int(image_id)])
        np.testing.assert_array_equal(out[j], gaussian_noise(images[j], 3, rng))
    # Independent of the batch: a reversed batch or a single image gives the same result per id.
    np.testing.assert_array_equal(corrupt(images[::-1], "gaussian", 3, 9, ids[::-1])[::-1], out)
    np.testing.assert_array_equal(corrupt(images[2:3], "gaussian", 3, 9, ids[2:3])[0], out[2])
    # Another seed gives another corruption; the input is not modified.
    assert not np.array_equal(out, corrupt(images, "gaussian", 3, seed=10, ids_or_indices=ids))
    np.testing.assert_array_equal(images, random_images((6, 16, 16, 1), seed=1))


def test_corrupt_accepts_numpy_index_arrays():
    images = random_images((3, 8, 8, 1))
    out = corrupt(images, "gaussian", 1, 0, np.arange(3))
    np.testing.assert_array_equal(out, corrupt(images, "gaussian", 1, 0, [0, 1, 2]))


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_is_refused(severity):
    images = random_images((2, 8, 8, 1))
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, "gaussian", severity, 0, [0, 1])
    with pytest.raises(ValueError, match="severity"):
        gaussian_noise(images, severity, np.random.default_rng(0))


def test_bad_kind_and_arguments_are_refused():
    images = random_images((2, 8, 8, 1))
    with pytest.raises(ValueError, match="kind"):
        corrupt(images, "blur", 1, 0, [0, 1])
    with pytest.raises(ValueError, match="ids"):
        corrupt(images, "gaussian", 1, 0, [0])
    with pytest.raises(ValueError, match="seed"):
        corrupt(images, "gaussian", 1, -1, [0, 1])
    with pytest.raises(TypeError, match="uint8"):
        corrupt(images.astype(np.float32), "gaussian", 1, 0, [0, 1])
