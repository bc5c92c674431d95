"""Image-quality corruptions used to create the quality shift between clients.

The formulas follow the reference (ImageNet-C style) implementation: images
are mapped to [0, 1], corrupted, clipped, scaled back by 255 and cast to
uint8 by *truncation* (``astype``), not rounding -- this matters for bitwise
reproducibility against the reference pipeline.

``corrupt`` is a small registry keyed by corruption kind.  Each kind is a
function ``fn(images_uint8, severity, rng) -> images_uint8`` with five
severities; new kinds (blur, poisson, jpeg, downsample, contrast, ...) are
added by writing such a function and registering it in ``CORRUPTIONS``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "GAUSSIAN_SIGMAS",
    "CORRUPTIONS",
    "gaussian_noise",
    "corrupt",
    "stable_int",
]

# Noise standard deviation in [0, 1] intensity space for severities 1..5.
GAUSSIAN_SIGMAS = (0.08, 0.12, 0.18, 0.26, 0.38)

N_SEVERITIES = 5


def _check_severity(severity: int) -> int:
    # Reject bools and floats such as 2.5 rather than silently truncating.
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)):
        raise ValueError(f"severity must be an integer in 1..{N_SEVERITIES}, got {severity!r}")
    if not 1 <= severity <= N_SEVERITIES:
        raise ValueError(f"severity must be in 1..{N_SEVERITIES}, got {severity}")
    return int(severity)


def _check_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    return images


def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise, drawn independently per pixel and channel.

    ``x' = uint8(clip(x / 255 + N(0, sigma^2), 0, 1) * 255)`` with
    ``sigma = GAUSSIAN_SIGMAS[severity - 1]`` and truncation toward zero in
    the final cast.  Works on any shape (one image or a batch); the output
    has the input's shape and dtype (uint8).
    """
    sigma = GAUSSIAN_SIGMAS[_check_severity(severity) - 1]
    x = _check_uint8(images) / 255.0
    noisy = np.clip(x + rng.normal(size=x.shape, scale=sigma), 0.0, 1.0) * 255.0
    return noisy.astype(np.uint8)  # truncation, as in the reference


# kind -> corruption function; every function accepts severities 1..5.
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian": gaussian_noise,
}


def stable_int(image_id) -> int:
    """Map an image id to a non-negative int that is the same in every process.

    Non-negative integers are used as they are; strings/bytes are hashed with
    BLAKE2b (64-bit digest).  Python's ``hash()`` is salted per process and
    would break reproducibility across MPI ranks, so it is not used.
    """
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        if image_id < 0:
            raise ValueError(f"integer image ids must be non-negative, got {image_id}")
        return int(image_id)
    if isinstance(image_id, str):
        image_id = image_id.encode("utf-8")
    if isinstance(image_id, (bytes, bytearray)):
        return int.from_bytes(hashlib.blake2b(image_id, digest_size=8).digest(), "little")
    raise TypeError(f"image ids must be non-negative ints, str or bytes, got {type(image_id).__name__}")


def corrupt(
    images: np.ndarray,
    kind: str,
    severity: int,
    seed: int,
    ids_or_indices: Sequence | np.ndarray,
) -> np.ndarray:
    """Corrupt a batch of images, deterministically per (seed, image id).

    Image j uses its own stream ``np.random.default_rng([seed,
    stable_int(ids_or_indices[j])])``, so its corruption does not depend on
    which other images are in the batch, their order, or which process
    handles it.

    Args:
        images: uint8 array [n, ...] (e.g. [n, H, W, C]).
        kind: a key of ``CORRUPTIONS`` (currently only ``"gaussian"``).
        severity: 1..5.
        seed: non-negative corruption seed.
        ids_or_indices: n image ids (non-negative ints or strings).

    Returns:
        New uint8 array with the shape of ``images``.
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption kind {kind!r}; known kinds: {sorted(CORRUPTIONS)}")
    severity = _check_severity(severity)
    images = _check_uint8(images)
    if int(seed) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    ids = list(ids_or_indices)
    if len(ids) != len(images):
        raise ValueError(f"got {len(ids)} ids for {len(images)} images")

    fn = CORRUPTIONS[kind]
    out = np.empty_like(images)
    for j, image_id in enumerate(ids):
        rng = np.random.default_rng([int(seed), stable_int(image_id)])
        out[j] = fn(images[j], severity, rng)
    return out
