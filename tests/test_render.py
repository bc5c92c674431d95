"""hpcfl.data.render: determinism, chunk invariance, and that the class is in the shapes, not in global statistics."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from hpcfl.data.render import CLASS_NAMES, render_images

N_CLASSES = len(CLASS_NAMES)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.resize(np.arange(N_CLASSES), n))


def test_class_names():
    assert len(CLASS_NAMES) == 5 and len(set(CLASS_NAMES)) == 5
    assert "epidural" in CLASS_NAMES and "subdural" in CLASS_NAMES


@pytest.mark.parametrize("size", [16, 32, 64])
def test_dtype_shape_and_range(size):
    images = render_images(np.arange(N_CLASSES), size, seed=0)
    assert images.dtype == np.uint8 and images.shape == (N_CLASSES, size, size, 1)
    # Grey levels are actually used: dark background, bright skull, not a constant image.
    assert images.min() < 40 and images.max() > 200
    assert render_images(np.array([], dtype=int), size, seed=0).shape == (0, size, size, 1)


def test_deterministic():
    labels = balanced_labels(12, 1)
    a = render_images(labels, 32, seed=7)
    assert a.tobytes() == render_images(labels, 32, seed=7).tobytes()
    assert not np.array_equal(a, render_images(labels, 32, seed=8))
    # Images within one set differ from each other.
    assert len({img.tobytes() for img in a}) == len(a)


def test_chunks_render_like_the_whole_set():
    labels = balanced_labels(30, 2)
    whole = render_images(labels, 32, seed=3)
    np.testing.assert_array_equal(render_images(labels[10:20], 32, seed=3, start_index=10), whole[10:20])
    chunks = [render_images(labels[i:i + 7], 32, seed=3, start_index=i) for i in range(0, 30, 7)]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


def test_image_depends_on_its_label():
    # Same stream (seed, index), different label: same head, different lesion.
    a = render_images(np.array([0]), 32, seed=5).astype(int)
    b = render_images(np.array([3]), 32, seed=5).astype(int)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize(
    "labels, size, seed, start",
    [
        (np.array([0, 5]), 32, 0, 0),  # label out of range
        (np.array([-1]), 32, 0, 0),
        (np.array([[0, 1]]), 32, 0, 0),  # not 1-D
        (np.array([0.0, 1.0]), 32, 0, 0),  # not integer
        (np.array([0]), 8, 0, 0),  # too small
        (np.array([0]), 32, -1, 0),  # negative seed
        (np.array([0]), 32, 0, -3),  # negative start index
    ],
)
def test_bad_arguments_are_refused(labels, size, seed, start):
    with pytest.raises(ValueError):
        render_images(labels, size, seed, start_index=start)


@pytest.fixture(scope="module")
def dataset():
    """900 balanced images at 32 px: 600 to fit, 300 to evaluate."""
    labels = balanced_labels(900, 4)
    images = render_images(labels, 32, seed=11).astype(np.float32) / 255.0
    return images[..., 0], labels


def fit_and_score(features, labels, **kwargs) -> float:
    model = LogisticRegression(max_iter=500, **kwargs).fit(features[:600], labels[:600])
    return balanced_accuracy_score(labels[600:], model.predict(features[600:]))


def test_mean_and_std_do_not_reveal_the_class(dataset):
    images, labels = dataset
    flat = images.reshape(len(images), -1)
    features = np.stack([flat.mean(1), flat.std(1)], axis=1)
    features = (features - features.mean(0)) / features.std(0)
    assert fit_and_score(features, labels) < 0.35  # chance: 0.2


def test_single_pixels_do_not_reveal_the_class(dataset):
    images, labels = dataset
    # The centre (ventricles), a point of the brain and one near the skull.
    for y, x in [(16, 16), (16, 13), (10, 22), (4, 16), (16, 28)]:
        assert fit_and_score(images[:, y, x, None], labels) < 0.35, (y, x)


def test_class_is_learnable_from_pixels(dataset):
    # Even a linear model on 2x2-pooled pixels beats chance clearly (a CNN does far better).
    images, labels = dataset
    pooled = images.reshape(len(images), 16, 2, 16, 2).mean((2, 4)).reshape(len(images), -1)
    assert fit_and_score(pooled, labels, C=0.1) > 0.32
