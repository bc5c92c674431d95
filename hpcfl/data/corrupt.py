"""Image-quality corruptions used to create the quality shift between clients.

``gaussian`` is the reference's (the paper's) corruption, bit for bit: images are mapped to [0, 1], noise is
added, the result is clipped, scaled back by 255 and cast to uint8 by *truncation* (``astype``), not rounding --
this matters for bitwise reproducibility against the reference pipeline.

Five more kinds model other ways a scanner or a pipeline degrades images (docs/corruptions.md gives every
formula and the reasons for each severity table):

==============  ===============================================================  ==========================
kind            what it does                                                     uses the rng
==============  ===============================================================  ==========================
``gaussian``    additive Gaussian noise (the paper's, sigma 0.18 at severity 3)  yes
``blur``        Gaussian blur, sigma scaled with the image side                  no
``poisson``     photon-count (shot) noise, as in low-dose CT / ImageNet-C shot   yes
``jpeg``        lossy JPEG compression through PIL, in memory                    no
``downsample``  PIL bilinear (antialiased) down-sampling, nearest-neighbour up   no
``contrast``    contrast loss toward the per-channel image mean (ImageNet-C)     no
==============  ===============================================================  ==========================

Each kind is a function ``fn(images_uint8, severity, rng) -> images_uint8`` taking one image [H, W, C] or a
batch [n, H, W, C] (``gaussian`` and the other point-wise kinds take any shape), with five severities whose
parameters are in ``SEVERITIES``. Severity 3 of every kind is calibrated to hurt a small CNN about as much as
the paper's Gaussian noise at severity 3 (docs/corruptions.md, "Calibration"). The new kinds round to the
nearest grey level; only ``gaussian`` keeps the reference's truncation.

``corrupt(images, kind, severity, seed, ids)`` applies a kind to a batch with one random stream per image,
``np.random.default_rng([seed, stable_int(id)])``, so an image's corruption depends only on (seed, its id).
Deterministic kinds ignore the stream.

``python -m preprocess.corrupt`` prints the pixel-level harm of every kind and severity (preprocess/corrupt.py).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "GAUSSIAN_SIGMAS",
    "BLUR_SIGMAS",
    "BLUR_REFERENCE_SIDE",
    "POISSON_PEAKS",
    "JPEG_QUALITIES",
    "DOWNSAMPLE_FACTORS",
    "CONTRAST_FACTORS",
    "SEVERITIES",
    "CORRUPTIONS",
    "KINDS",
    "gaussian_noise",
    "gaussian_blur",
    "poisson_noise",
    "jpeg_compression",
    "downsample",
    "contrast",
    "corrupt",
    "stable_int",
]

# Noise standard deviation in [0, 1] intensity space for severities 1..5 (the reference's, §6.5).
GAUSSIAN_SIGMAS = (0.08, 0.12, 0.18, 0.26, 0.38)
# Blur standard deviation in pixels *of a 224-pixel image*; an image of side S uses sigma * S / 224, so the
# same severity blurs the same anatomy at every benchmark resolution (1.14 px at severity 3 on 32 px).
BLUR_SIGMAS = (3.0, 5.0, 8.0, 11.0, 15.0)
BLUR_REFERENCE_SIDE = 224
# Photons at full white (x = 1): lambda = x * peak; fewer photons, more noise (relative noise 1/sqrt(x*peak)).
POISSON_PEAKS = (80.0, 40.0, 20.0, 10.0, 5.0)
# PIL JPEG quality (1..95; PIL's default is 75).
JPEG_QUALITIES = (20, 10, 5, 3, 1)
# Side reduction factor: S -> round(S / factor) and back to S.
DOWNSAMPLE_FACTORS = (1.5, 2.0, 2.5, 3.0, 4.0)
# Fraction of the contrast kept around the per-channel mean (1 would be the identity).
CONTRAST_FACTORS = (0.6, 0.45, 0.35, 0.2, 0.1)

SEVERITIES: dict[str, tuple] = {
    "gaussian": GAUSSIAN_SIGMAS,
    "blur": BLUR_SIGMAS,
    "poisson": POISSON_PEAKS,
    "jpeg": JPEG_QUALITIES,
    "downsample": DOWNSAMPLE_FACTORS,
    "contrast": CONTRAST_FACTORS,
}

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


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """[H, W, C] or [n, H, W, C] -> ([n, H, W, C], whether a single image came in)."""
    images = _check_uint8(images)
    if images.ndim == 3:
        return images[None], True
    if images.ndim == 4:
        return images, False
    raise ValueError(f"images must be [H, W, C] or [n, H, W, C], got shape {images.shape}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Values on the 0..255 scale -> uint8, rounded to the nearest grey level and clipped."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


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


def blur_sigma(severity: int, height: int, width: int) -> float:
    """The blur's standard deviation in pixels for an image of this size: BLUR_SIGMAS scaled by min(H, W)/224."""
    return BLUR_SIGMAS[_check_severity(severity) - 1] * min(height, width) / BLUR_REFERENCE_SIDE


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Gaussian blur of each image and channel (channels are not mixed).

    ``x' = round(G_s * x)`` with ``s = blur_sigma(severity, H, W)`` and scipy.ndimage.gaussian_filter's
    ``mode="nearest"`` border (as ImageNet-C's skimage blur), kernel truncated at 4 s. Deterministic: ``rng``
    is ignored.
    """
    from scipy.ndimage import gaussian_filter

    severity = _check_severity(severity)
    batch, single = _as_batch(images)
    sigma = blur_sigma(severity, batch.shape[1], batch.shape[2])
    out = np.empty_like(batch)
    for j in range(len(batch)):
        out[j] = _to_uint8(gaussian_filter(batch[j].astype(np.float64), sigma=(sigma, sigma, 0), mode="nearest"))
    return out[0] if single else out


def poisson_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Photon-count (shot) noise: ``x' = round(255 * clip(Poisson(x * peak) / peak, 0, 1))`` with x in [0, 1].

    ``peak = POISSON_PEAKS[severity - 1]`` is the expected photon count of a white pixel, so the noise's
    standard deviation is ``sqrt(x / peak)``: signal-dependent, zero on black (as ImageNet-C's shot noise).
    One Poisson draw per pixel and channel, in C order. Works on any shape.
    """
    peak = POISSON_PEAKS[_check_severity(severity) - 1]
    x = _check_uint8(images) / 255.0
    counts = rng.poisson(x * peak)
    return _to_uint8(np.clip(counts / peak, 0.0, 1.0) * 255.0)


def _pil_modes(channels: int) -> str | None:
    return {1: "L", 3: "RGB"}.get(channels)


def _through_pil(image: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn(PIL image) -> PIL image`` to one uint8 [H, W, C]: as L or RGB, other channel counts per channel."""
    from PIL import Image

    mode = _pil_modes(image.shape[2])
    if mode == "L":
        return np.asarray(fn(Image.fromarray(np.ascontiguousarray(image[:, :, 0]))), dtype=np.uint8)[:, :, None]
    if mode == "RGB":
        return np.asarray(fn(Image.fromarray(np.ascontiguousarray(image))), dtype=np.uint8)
    return np.stack([_through_pil(image[:, :, c:c + 1], fn)[:, :, 0] for c in range(image.shape[2])], axis=-1)


def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Save each image as JPEG at ``quality = JPEG_QUALITIES[severity - 1]`` with PIL (in memory) and decode it.

    One channel is saved as a grayscale (L) JPEG, three as RGB (PIL's defaults otherwise: 4:2:0 chroma
    subsampling, standard tables); other channel counts are saved channel by channel. Deterministic: ``rng`` is
    ignored.
    """
    from PIL import Image

    quality = JPEG_QUALITIES[_check_severity(severity) - 1]

    def roundtrip(img):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            decoded.load()
            return decoded.copy()

    batch, single = _as_batch(images)
    out = np.stack([_through_pil(im, roundtrip) for im in batch]) if len(batch) else batch.copy()
    return out[0] if single else out


def downsample(images: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Lower resolution: resize to ``(round(H / f), round(W / f))`` (at least 1 px) with PIL BILINEAR, which
    filters (antialiases) when it shrinks, then back to (H, W) with NEAREST, which shows the lost resolution as
    pixel blocks (unlike a blur). ``f = DOWNSAMPLE_FACTORS[severity - 1]``. Deterministic: ``rng`` is ignored.
    """
    from PIL import Image

    factor = DOWNSAMPLE_FACTORS[_check_severity(severity) - 1]
    batch, single = _as_batch(images)
    h, w = batch.shape[1:3]
    small = (max(1, round(w / factor)), max(1, round(h / factor)))  # PIL sizes are (width, height)

    def down_up(img):
        return img.resize(small, Image.Resampling.BILINEAR).resize((w, h), Image.Resampling.NEAREST)

    out = np.stack([_through_pil(im, down_up) for im in batch]) if len(batch) else batch.copy()
    return out[0] if single else out


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Contrast loss toward each image's mean, per channel (ImageNet-C's contrast):
    ``x' = round(clip((x - m) * c + m, 0, 255))`` with ``m`` the mean of the image's channel over its pixels and
    ``c = CONTRAST_FACTORS[severity - 1]``. Deterministic: ``rng`` is ignored.
    """
    c = CONTRAST_FACTORS[_check_severity(severity) - 1]
    batch, single = _as_batch(images)
    x = batch.astype(np.float64)
    m = x.mean(axis=(1, 2), keepdims=True)
    out = _to_uint8((x - m) * c + m)
    return out[0] if single else out


# kind -> corruption function; every function accepts severities 1..5.
CORRUPTIONS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "gaussian": gaussian_noise,
    "blur": gaussian_blur,
    "poisson": poisson_noise,
    "jpeg": jpeg_compression,
    "downsample": downsample,
    "contrast": contrast,
}
KINDS = tuple(CORRUPTIONS)
# Kinds whose result does not depend on the random stream.
DETERMINISTIC = frozenset({"blur", "jpeg", "downsample", "contrast"})


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
    handles it.  Deterministic kinds (blur, jpeg, downsample, contrast)
    ignore the stream.

    Args:
        images: uint8 array [n, H, W, C] (``gaussian`` and ``poisson`` take any [n, ...]).
        kind: a key of ``CORRUPTIONS``.
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
