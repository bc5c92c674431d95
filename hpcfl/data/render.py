"""Procedural stand-in for RSNA intracranial-hemorrhage (ICH) CT slices.

The built-in benchmark must run on a laptop CPU, so instead of real DICOMs we
render small grayscale "head CT" slices whose hemorrhage subtype is encoded in
the *shape, location and texture* of a lesion, never in a global statistic:

* every image has a head (soft-tissue ellipse with a bright skull rim), two
  dark lateral ventricles (often with bright, normal choroid-plexus
  calcifications), a few dark sulci, low-frequency tissue texture, scanner
  noise and a random window (brightness / contrast) jitter;
* the class adds one kind of blood (hyperdense, i.e. brighter than brain):

  ==================  ===================================================
  epidural            thick biconvex lens pressed against the inner skull
  intraparenchymal    irregular round clot deep in the brain, dark edema rim
  intraventricular    blood layering in the lower part of the ventricles
  subarachnoid        thin bright streaks along some sulci
  subdural            thin, long crescent along the inner skull
  ==================  ===================================================

Lesion contrast, size and place, head geometry and the global window are
randomised per image, so neither the mean intensity nor any single pixel
predicts the class, while a small CNN learns it within a few epochs and loses
accuracy when the images are corrupted with Gaussian noise (the quality shift
under study).  Geometry is defined in resolution-independent coordinates, so
any ``size`` shows the same anatomy (at 16 px it is very coarse).

Every image j is drawn from its own stream ``np.random.default_rng([seed,
start_index + j])``; any chunk of a data set therefore renders to the same
bytes as the corresponding slice of the whole set, which lets MPI ranks or
worker processes render disjoint chunks independently.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CLASS_NAMES", "render_images"]

CLASS_NAMES = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)

# Class indices, for readability below.
_EDH, _IPH, _IVH, _SAH, _SDH = range(5)


def render_images(
    labels: np.ndarray, size: int, seed: int, start_index: int = 0
) -> np.ndarray:
    """Render one synthetic head-CT slice per label.

    Args:
        labels: integer class indices in ``[0, len(CLASS_NAMES))``, shape [n].
        size: image side in pixels (>= 16; 32 and 64 are the tested sizes).
        seed: non-negative data-set seed.
        start_index: global index of ``labels[0]`` within the data set.

    Returns:
        uint8 array [n, size, size, 1].  Image j is rendered from its own RNG
        stream ``np.random.default_rng([seed, start_index + j])``, so any
        subset/chunk renders identically to the same slice of the full set.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise ValueError(f"labels must lie in [0, {len(CLASS_NAMES)})")
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if int(seed) < 0 or int(start_index) < 0:
        raise ValueError("seed and start_index must be non-negative")

    # Pixel-centre coordinates in [-1, 1]; y grows downwards (image rows).
    # float32 throughout: ~2-7x faster than float64 and precise enough for
    # 8-bit output.  (Scalars are kept as Python floats so they never upcast.)
    axis = ((np.arange(size) + 0.5) * (2.0 / size) - 1.0).astype(np.float32)

    out = np.empty((labels.size, size, size, 1), dtype=np.uint8)
    for j, label in enumerate(labels):
        rng = np.random.default_rng([int(seed), int(start_index) + j])
        img = _render_one(int(label), axis, rng)
        # Round (not truncate) to the nearest grey level.
        out[j, :, :, 0] = np.rint(np.clip(img, 0.0, 1.0) * 255.0)
    return out


# --------------------------------------------------------------------------
# helpers


def _soft(dist, width: float):
    """Anti-aliased indicator of ``dist < 0`` (1 inside, 0 outside).

    ``dist`` is a signed distance, ``width`` one pixel in the same units; the
    linear ramp keeps thin structures visible at 32 px instead of aliasing.
    """
    return np.clip(0.5 - dist * (1.0 / width), 0.0, 1.0)


def _texture(axis, rng, n_waves: int, freq: tuple, amp: float):
    """Smooth random field: a sum of plane waves with random direction/phase.

    cos(kx*x + ky*y + p) = cos(kx*x + p)cos(ky*y) - sin(kx*x + p)sin(ky*y),
    so the whole field is one small matrix product of 1-D factors instead of
    n_waves full-image cosines.
    """
    k = rng.uniform(*freq, n_waves) * 2.0 * np.pi
    direction = rng.uniform(0.0, 2.0 * np.pi, n_waves)
    phase = rng.uniform(0.0, 2.0 * np.pi, n_waves)
    ax = (np.outer(axis, k * np.cos(direction)) + phase).astype(np.float32)  # [S, n]
    ay = np.outer(axis, k * np.sin(direction)).astype(np.float32)
    rows = np.concatenate([np.cos(ay), -np.sin(ay)], axis=1)  # y factors
    cols = np.concatenate([np.cos(ax), np.sin(ax)], axis=1)  # x factors
    return (rows @ cols.T) * np.float32(amp / np.sqrt(n_waves))


def _radial_lines(u, v, rng, count, r_start, r_end, width, pix):
    """Union of ``count`` slightly wavy radial line segments (sulci).

    Each segment starts at head-frame radius ``r_start`` (drawn per line) and
    runs outwards to ``r_end`` (the inner skull).  Returns a soft mask.
    """
    def draw(lo, hi):
        return rng.uniform(lo, hi, count).astype(np.float32)[:, None, None]

    phi = draw(0.0, 2.0 * np.pi)
    start = draw(*r_start)
    wobble, wfreq, wphase = draw(0.0, 0.04), draw(8.0, 16.0), draw(0.0, 2.0 * np.pi)
    along = u * np.cos(phi) + v * np.sin(phi)  # coordinate along the line
    across = -u * np.sin(phi) + v * np.cos(phi) + wobble * np.sin(wfreq * along + wphase)
    mask = _soft(np.abs(across) - width / 2.0, pix)
    mask *= _soft(start - along, pix)  # starts at `start` ...
    mask *= _soft(along - r_end, pix)  # ... and stops at the skull
    return mask.max(axis=0)


def _ellipse(pu, pv, ea: float, eb: float, pix: float):
    """Soft mask of the axis-aligned ellipse (pu/ea)^2 + (pv/eb)^2 < 1."""
    rv = np.sqrt((pu * (1.0 / ea)) ** 2 + (pv * (1.0 / eb)) ** 2)
    return _soft((rv - 1.0) * min(ea, eb), pix)  # approx. signed distance


# --------------------------------------------------------------------------
# one image


def _render_one(label: int, axis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Float32 image in ~[0, 1] for one label, drawn entirely from ``rng``."""

    def U(lo: float, hi: float) -> float:  # Python float: never upcasts float32
        return float(rng.uniform(lo, hi))

    # ---- head geometry: centre, semi-axes, rotation, skull thickness -------
    # Large position/size jitter so that no fixed pixel sees a fixed structure.
    cx, cy = U(-0.12, 0.12), U(-0.12, 0.12)
    a = U(0.60, 0.76)  # left-right semi-axis
    b = min(a * U(1.05, 1.25), 0.88)  # heads are longer front-back
    theta = U(-0.35, 0.35)
    dx, dy = axis[None, :] - cx, axis[:, None] - cy
    # (u, v): head frame, scaled so that the outer skull is the unit circle.
    u = (math.cos(theta) * dx + math.sin(theta) * dy) * (1.0 / a)
    v = (-math.sin(theta) * dx + math.cos(theta) * dy) * (1.0 / b)
    r = np.sqrt(u * u + v * v)
    pix = (2.0 / axis.size) / math.sqrt(a * b)  # one pixel in head-frame units
    inner = 1.0 - U(0.07, 0.11)  # inner skull radius

    head = _soft(r - 1.0, pix)
    brain = _soft(r - inner, pix)

    # ---- tissue intensities (before the global window jitter) -------------
    tissue = U(0.40, 0.46)
    csf = tissue - U(0.12, 0.20)
    skull = U(0.85, 1.0)
    background = U(0.0, 0.06)

    # Brain content: textured parenchyma, then structures painted over it.
    content = tissue + _texture(axis, rng, 4, (0.6, 2.5), 0.035)

    def paint(mask, value: float):
        nonlocal content
        content = content + mask * (value - content)

    # Normal anatomy present in every image: dark sulci and two ventricles
    # (the SAH streaks and IVH blood must be told apart from these).
    n_sulci = int(rng.integers(3, 8))
    sulci = _radial_lines(u, v, rng, n_sulci, (0.6, 0.78), inner, 0.07, pix)
    paint(sulci, tissue - U(0.03, 0.08))

    ou, ov = U(-0.12, 0.12), U(-0.18, 0.08)  # ventricle system offset
    vx = U(0.09, 0.15)  # half distance between the two ventricles
    ea, eb = U(0.09, 0.14), U(0.24, 0.34)
    # Frontal horns (top) close together, occipital horns (bottom, where
    # blood layers in a supine patient) diverge: an inverted "V".
    tilt = U(0.15, 0.45)
    ventricles = []  # (mask, long-axis coordinate in [-1, 1]) per side
    for side in (-1.0, 1.0):
        du, dv = u - (ou + side * vx), v - ov
        c, s = math.cos(side * tilt), -math.sin(side * tilt)
        pu, pv = c * du + s * dv, -s * du + c * dv
        ventricles.append((_ellipse(pu, pv, ea, eb, pix), pv * (1.0 / eb)))
    paint(np.maximum(ventricles[0][0], ventricles[1][0]), csf)
    # Normal bright calcifications (choroid plexus in the occipital horns).
    # Without them a single central pixel would betray intraventricular blood;
    # with them the CNN has to tell a small bright band from a fluid level.
    for mask, long_axis in ventricles:
        if rng.random() < 0.7:
            band = _soft(np.abs(long_axis - U(0.3, 0.7)) - U(0.15, 0.3), pix / eb)
            paint(band * mask, tissue + U(0.15, 0.4))

    # ---- the lesion (blood is hyperdense: brighter than brain) ------------
    blood = tissue + U(0.3, 0.5)

    if label in (_EDH, _SDH):
        # Extra-axial collections hug the inner skull at a random angle.
        phi = U(0.0, 2.0 * np.pi)
        # Angular distance to phi, via the cosine of the angle difference
        # (cheaper than arctan2 + wrapping).
        cos_d = (u * math.cos(phi) + v * math.sin(phi)) / np.maximum(r, 1e-6)
        dang = np.arccos(np.clip(cos_d, -1.0, 1.0))
        if label == _EDH:
            # Biconvex lens: short arc, thick middle, quadratic taper.
            half, depth = U(0.5, 0.8), U(0.25, 0.4)
            profile = depth * np.clip(1.0 - (dang * (1.0 / half)) ** 2, 0.0, None)
        else:
            # Crescent: long arc, thin and of nearly constant thickness.
            half, depth = U(1.2, 2.0), U(0.1, 0.16)
            profile = depth * np.clip(1.0 - (dang * (1.0 / half)) ** 2, 0.0, None) ** 0.3
        lesion = _soft((inner - profile) - r, pix) * (profile > 0)
        paint(lesion, blood)

    elif label == _IPH:
        # Irregular round clot deep in the parenchyma with a dark edema rim.
        rho, beta, radius = U(0.35, 0.55), U(0.0, 2.0 * np.pi), U(0.14, 0.26)
        du, dv = u - rho * math.cos(beta), v - rho * math.sin(beta)
        lobes = 1.0 + U(0.0, 0.2) * np.cos(
            int(rng.integers(2, 4)) * np.arctan2(dv, du) + U(0.0, 2.0 * np.pi)
        )
        dist = np.sqrt(du * du + dv * dv) - radius * lobes
        paint(_soft(dist - 0.5 * radius, pix), tissue - U(0.03, 0.08))
        paint(_soft(dist, pix), blood)

    elif label == _IVH:
        # Blood layers in the dependent part of one or both ventricles.
        both = rng.random() < 0.6
        which = int(rng.integers(2))
        for k, (mask, long_axis) in enumerate(ventricles):
            if both or k == which:
                # Fill from the bottom (long axis = 1) up to `level` (30-70 %),
                # with a flat fluid level blurred over ~2 pixels.
                level = U(-0.4, 0.4)
                paint(_soft(level - long_axis, 2.0 * pix / eb) * mask, blood)

    elif label == _SAH:
        # Blood in the subarachnoid space: a few bright sulcal streaks.
        n_streaks = int(rng.integers(4, 8))
        streaks = _radial_lines(u, v, rng, n_streaks, (0.45, 0.7), inner, 0.09, pix)
        paint(streaks, blood)

    img = background * (1.0 - head) + skull * (head - brain) + content * brain
    img += _texture(axis, rng, 3, (1.0, 4.0), 0.02) * (1.0 - head)

    # ---- acquisition: window (brightness/contrast) jitter and scanner noise
    contrast, brightness = U(0.75, 1.25), U(-0.12, 0.12)
    img = (img - 0.4) * contrast + (0.4 + brightness)
    img += rng.standard_normal(img.shape, dtype=np.float32) * U(0.02, 0.06)
    return img
