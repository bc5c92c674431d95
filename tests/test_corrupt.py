"""hpcfl.data.corrupt: the reference's Gaussian-noise formula, the other kinds' formulas, per-image determinism,
severity tables monotonic in harm, argument checks."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from hpcfl.data.corrupt import (
    BLUR_SIGMAS, CONTRAST_FACTORS, CORRUPTIONS, DETERMINISTIC, DOWNSAMPLE_FACTORS, GAUSSIAN_SIGMAS, JPEG_QUALITIES,
    KINDS, POISSON_PEAKS, SEVERITIES, contrast, corrupt, downsample, gaussian_blur, gaussian_noise,
    jpeg_compression, poisson_noise, stable_int,
)
from hpcfl.data.render import render_images
from preprocess.corrupt import harm_table

NEW_KINDS = ["blur", "poisson", "jpeg", "downsample", "contrast"]


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
        corrupt(images, "motion_blur", 1, 0, [0, 1])
    with pytest.raises(ValueError, match="ids"):
        corrupt(images, "gaussian", 1, 0, [0])
    with pytest.raises(ValueError, match="seed"):
        corrupt(images, "gaussian", 1, -1, [0, 1])
    with pytest.raises(TypeError, match="uint8"):
        corrupt(images.astype(np.float32), "gaussian", 1, 0, [0, 1])


# ---------------------------------------------------------------------------------------------------------------
# The other kinds: blur, poisson, jpeg, downsample, contrast.


@pytest.fixture(scope="module")
def rendered():
    """A fixed set of benchmark-like images (32 px grayscale, every class)."""
    return render_images(np.arange(20) % 5, 32, seed=3)


def test_registry_and_severity_tables():
    assert set(CORRUPTIONS) == set(SEVERITIES) == set(KINDS) == {"gaussian", *NEW_KINDS}
    assert SEVERITIES["gaussian"] is GAUSSIAN_SIGMAS
    assert SEVERITIES["blur"] == BLUR_SIGMAS and SEVERITIES["poisson"] == POISSON_PEAKS
    assert SEVERITIES["jpeg"] == JPEG_QUALITIES and SEVERITIES["downsample"] == DOWNSAMPLE_FACTORS
    assert SEVERITIES["contrast"] == CONTRAST_FACTORS
    for kind, table in SEVERITIES.items():
        assert len(table) == 5, kind
    # Each parameter moves in its harmful direction: more blur / fewer photons / lower quality / ...
    assert all(np.diff(BLUR_SIGMAS) > 0) and all(np.diff(DOWNSAMPLE_FACTORS) > 0)
    assert all(np.diff(POISSON_PEAKS) < 0) and all(np.diff(JPEG_QUALITIES) < 0) and all(np.diff(CONTRAST_FACTORS) < 0)
    assert all(1 <= q <= 95 for q in JPEG_QUALITIES) and all(0 < c < 1 for c in CONTRAST_FACTORS)
    assert DETERMINISTIC == {"blur", "jpeg", "downsample", "contrast"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_and_dtype(kind, channels):
    images = random_images((3, 24, 20, channels))  # not square: H and W must not be swapped
    out = corrupt(images, kind, 3, seed=0, ids_or_indices=[0, 1, 2])
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert not np.array_equal(out, images)
    # The functions take a batch [n, H, W, C] or one image [H, W, C].
    fn = CORRUPTIONS[kind]
    batch = fn(images, 3, np.random.default_rng(0))
    assert batch.dtype == np.uint8 and batch.shape == images.shape
    single = fn(images[0], 3, np.random.default_rng(0))
    assert single.dtype == np.uint8 and single.shape == images.shape[1:]


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_deterministic_per_id_and_independent_of_the_batch(kind):
    images = random_images((5, 16, 16, 1), seed=2)
    ids = ["x", "y", 3, 40, "ID_z"]
    out = corrupt(images, kind, 4, seed=5, ids_or_indices=ids)
    np.testing.assert_array_equal(out, corrupt(images, kind, 4, seed=5, ids_or_indices=ids))
    np.testing.assert_array_equal(corrupt(images[::-1], kind, 4, 5, ids[::-1])[::-1], out)
    np.testing.assert_array_equal(corrupt(images[1:2], kind, 4, 5, ids[1:2])[0], out[1])
    for j, image_id in enumerate(ids):
        rng = np.random.default_rng([5, stable_int(image_id)])
        np.testing.assert_array_equal(out[j], CORRUPTIONS[kind](images[j], 4, rng))
    other_seed = corrupt(images, kind, 4, seed=6, ids_or_indices=ids)
    if kind in DETERMINISTIC:  # the stream is ignored: the seed changes nothing
        np.testing.assert_array_equal(other_seed, out)
        np.testing.assert_array_equal(CORRUPTIONS[kind](images, 4, None), out)
    else:
        assert not np.array_equal(other_seed, out)
    np.testing.assert_array_equal(images, random_images((5, 16, 16, 1), seed=2))  # input untouched


@pytest.mark.parametrize("kind", KINDS)
def test_harm_increases_with_severity(kind, rendered):
    harm = [np.abs(corrupt(rendered, kind, s, 0, np.arange(len(rendered))).astype(float) - rendered).mean()
            for s in range(1, 6)]
    assert all(np.diff(harm) > 0), harm
    assert harm[0] > 0


def test_harm_table_lists_every_kind_and_severity(rendered):
    rows = harm_table(rendered[:4])
    assert [(k, s) for k, s, *_ in rows] == [(k, s) for k in KINDS for s in range(1, 6)]
    assert all(mae > 0 and psnr > 0 for *_, mae, psnr in rows)


def test_poisson_formula():
    images = np.array([[[[0], [51]], [[128], [255]]]], np.uint8)  # x = 0, 0.2, 0.502, 1
    for severity in (1, 5):
        peak = POISSON_PEAKS[severity - 1]
        out = poisson_noise(images, severity, np.random.default_rng(7))
        counts = np.random.default_rng(7).poisson(images / 255.0 * peak)
        expected = np.rint(np.minimum(counts / peak, 1.0) * 255.0).astype(np.uint8)
        np.testing.assert_array_equal(out, expected)
        assert out[0, 0, 0, 0] == 0  # no photons, no noise on black
    # Signal-dependent noise: variance x / peak in [0, 1] units, mean x (unbiased away from the clip at 1).
    grey = np.full((200, 200, 1), 64, np.uint8)  # x = 0.251
    x = 64 / 255
    out = poisson_noise(grey, 3, np.random.default_rng(0)) / 255.0
    assert abs(out.mean() - x) < 0.01
    assert abs(out.var() - x / POISSON_PEAKS[2]) < 0.05 * x / POISSON_PEAKS[2]
    # The values are multiples of 255 / peak (counts / peak), rounded.
    assert set(np.unique(poisson_noise(grey, 5, np.random.default_rng(1)))) <= {
        int(np.rint(min(k / POISSON_PEAKS[4], 1.0) * 255)) for k in range(100)}


def test_contrast_formula():
    image = np.array([[[0, 10, 200], [100, 10, 255]], [[200, 10, 0], [255, 10, 45]]], np.uint8)[None]  # [1,2,2,3]
    c = CONTRAST_FACTORS[2]
    out = contrast(image, 3)
    # Per channel means: 138.75, 10, 125.
    m = np.array([138.75, 10.0, 125.0])
    expected = np.rint((image.astype(float) - m) * c + m).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0, 0, 0] == round(138.75 - 138.75 * c)  # written out once: (0 - m) * c + m
    np.testing.assert_array_equal(out[..., 1], 10)  # a flat channel is unchanged (rounding, not truncation)
    # The mean is (up to rounding) kept and the spread shrinks by c.
    img = random_images((1, 32, 32, 1))
    out = contrast(img, 5).astype(float)
    assert abs(out.mean() - img.mean()) < 0.5
    assert abs(out.std() - CONTRAST_FACTORS[4] * img.std()) < 0.5


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_matches_pil_at_that_quality(channels, mode, severity, rendered):
    images = np.repeat(rendered[:3], channels, axis=-1) if channels == 3 else rendered[:3]
    if channels == 3:  # give the colour channels different content
        images = images.copy()
        images[..., 1] = images[..., 1] // 2
        images[..., 2] = 255 - images[..., 2]
    out = jpeg_compression(images, severity)
    for j in range(len(images)):
        buf = io.BytesIO()
        Image.fromarray(images[j, :, :, 0] if channels == 1 else images[j]).save(
            buf, format="JPEG", quality=JPEG_QUALITIES[severity - 1])
        decoded = Image.open(io.BytesIO(buf.getvalue()))
        assert decoded.mode == mode
        expected = np.asarray(decoded)
        np.testing.assert_array_equal(out[j], expected.reshape(out[j].shape))
    assert not np.array_equal(out, images)  # lossy


def test_blur_formula_and_resolution_scaling(rendered):
    for side in (32, 64):
        images = random_images((2, side, side, 3))
        sigma = BLUR_SIGMAS[2] * side / 224
        out = gaussian_blur(images, 3)
        for j in range(2):
            for ch in range(3):  # per channel: channels are not mixed
                ref = gaussian_filter(images[j, :, :, ch].astype(float), sigma, mode="nearest")
                np.testing.assert_array_equal(out[j, :, :, ch], np.rint(ref).astype(np.uint8))
    flat = np.full((1, 32, 32, 1), 128, np.uint8)
    np.testing.assert_array_equal(gaussian_blur(flat, 5), flat)  # rounding: a flat image stays exactly flat
    # The same severity blurs the same anatomy at every size: compare after bringing both to 32 px.
    small, large = render_images(np.arange(5), 32, 1), render_images(np.arange(5), 128, 1)
    shrink = large.reshape(5, 32, 4, 32, 4, 1).mean(axis=(2, 4))
    diff_small = np.abs(gaussian_blur(small, 4).astype(float) - small).mean()
    blurred_large = gaussian_blur(large, 4).astype(float).reshape(5, 32, 4, 32, 4, 1).mean(axis=(2, 4))
    diff_large = np.abs(blurred_large - shrink).mean()
    assert 0.5 < diff_large / diff_small < 2.0


def test_downsample_matches_pil_and_makes_blocks():
    images = random_images((2, 32, 32, 1))
    out = downsample(images, 2)  # factor 2: 32 -> 16 -> 32
    assert DOWNSAMPLE_FACTORS[1] == 2.0
    for j in range(2):
        small = Image.fromarray(images[j, :, :, 0]).resize((16, 16), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(out[j, :, :, 0], np.repeat(np.repeat(np.asarray(small), 2, 0), 2, 1))
    flat = np.full((1, 30, 30, 3), 77, np.uint8)
    np.testing.assert_array_equal(downsample(flat, 5), flat)
    for severity in range(1, 6):  # the number of distinct rows shows the lost resolution
        distinct_rows = len(np.unique(downsample(images, severity)[0, :, :, 0], axis=0))
        assert distinct_rows == round(32 / DOWNSAMPLE_FACTORS[severity - 1])


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_is_refused_for_every_kind(kind, severity):
    images = random_images((2, 8, 8, 1))
    with pytest.raises(ValueError, match="severity"):
        corrupt(images, kind, severity, 0, [0, 1])
    with pytest.raises(ValueError, match="severity"):
        CORRUPTIONS[kind](images, severity, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["blur", "jpeg", "downsample", "contrast"])
def test_spatial_kinds_refuse_arrays_that_are_not_images(kind):
    with pytest.raises(ValueError, match="shape"):
        CORRUPTIONS[kind](random_images((8, 8)), 1, None)
    with pytest.raises(TypeError, match="uint8"):
        CORRUPTIONS[kind](random_images((1, 8, 8, 1)).astype(np.float32), 1, None)
