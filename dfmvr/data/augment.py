"""Photo-like augmentation of single views for the face parse net.

The parse net learns from synthetic renders (clean faces over procedural backgrounds) and has to
hold up on real photos: framed a little differently, shot against cluttered scenes, under other
white balance and exposure, out of focus or shaken, noisy, and JPEG-compressed.
:class:`PhotoAugment` degrades one view ``(image uint8 [S, S, 3] RGB, mask uint8 [S, S])`` that
way, each component on with its own probability; :func:`augment_views` does it to a training
batch (``[N, 3, S, S]`` in [-1, 1], ``[N, S, S]`` int64). Horizontal flips are not here:
:func:`dfmvr.train.parsing.random_hflip` does them, with the left/right class swap they need.

Order of the stages, and why
----------------------------
1. geometry (scale, rotation, translation as one affine; image bilinear, mask nearest): first,
   because it is the only stage that moves the mask, so it must see the clean image (resampling
   noise or JPEG blocks would smooth them away) and every later stage must work in the output
   frame with the final mask;
2. background replacement: needs the final mask to know which pixels are background; it runs
   before every photometric stage so that the pasted background and the face get the same colour
   cast, blur, noise and compression, as in one photo (pasted afterwards, a background with
   statistics of its own would be a cue the net could use instead of the face);
3. colour (brightness, contrast, saturation, hue, gamma): the scene's light and the camera's
   tone curve, applied to the whole composed picture;
4. blur (Gaussian, sometimes motion): the lens and the shake, before the sensor adds its noise;
5. noise (Gaussian, per pixel and channel): the sensor, after the optics so it stays sharp;
6. JPEG: the last thing that happens to a photo (camera or upload), over all of the above.

Only stages 1 and 2 read the mask and only stage 1 changes it: classes are never mixed
(nearest-neighbour resampling) and pixels brought in from outside the source are background (0).
The renders' faces often touch the frame, so the image's reflected or replicated border would
bring mirrored pieces of face into pixels labelled background; :func:`warp_view` fills those with
the surrounding background's colour instead.

New backgrounds are crops of the pictures passed as ``backgrounds`` or, without them, procedural
textures with random shapes. Other training views work as pictures, but their faces then appear,
labelled background, behind the face (as bystanders do in photos); pictures without faces are
the cleaner choice.

In the parse net's training loop, after the flips and before moving to the device::

    augment = PhotoAugment(AugmentSettings(strength=0.8))
    rng = np.random.default_rng(cfg.seed)
    ...
    images, masks = random_hflip(images, masks, flip_rng)
    images, masks = augment_views(images, masks, augment, rng)

Strength: :attr:`AugmentSettings.strength` in [0, 1] scales every component's magnitude (affine
ranges, colour factors, gamma, blur sigma and length, noise sigma, JPEG quality loss ``100 - q``)
and the probability of background replacement (which has no magnitude); ``strength=0`` returns
the inputs untouched and draws nothing from ``rng``. Sizes (blur sigma, motion length, edge
softness, translation) are fractions of the image side, so a setting means the same at 64 and
224 px.

One job: the photo augmentation (each perturbation and their composition, masks following every
geometric one).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from dfmvr.data.backgrounds import random_background
from dfmvr.data.transforms import color_jitter, to_model_range

_logger = logging.getLogger(__name__)

BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE}
"""Image border modes of the affine warp (the mask is always filled with background, 0)."""

_PROBABILITIES = ("geometry_p", "background_p", "color_p", "blur_p", "motion_blur_p", "noise_p", "jpeg_p")


@dataclass(frozen=True, kw_only=True, slots=True)
class AugmentSettings:
    """Probabilities and ranges of :class:`PhotoAugment` (each range is at ``strength=1``)."""

    strength: float = 1.0
    """In [0, 1]: scales every magnitude below and the probability of background replacement;
    0 turns augmentation off (inputs returned as they are)."""
    geometry_p: float = 0.7
    """Probability of the affine jitter."""
    max_scale_change: float = 0.12
    """Zoom factor drawn log-uniformly in ``[1 / (1 + m), 1 + m]``: faces a little smaller or larger
    than the renders' framing, as face detectors' crops are."""
    max_rotation_deg: float = 12.0
    """In-plane rotation drawn uniformly in ``+-`` this, degrees (head roll and camera tilt beyond
    the renders' few degrees)."""
    max_translation: float = 0.05
    """Shift of each axis drawn uniformly in ``+-`` this fraction of the image side (crop
    off-centre). Kept small: the renders' faces fill most of the frame and often touch its top."""
    border: str = "reflect"
    """How the image is filled where the warp reaches outside the source: ``"reflect"`` (mirror,
    no constant-colour stripes) or ``"replicate"``; the mask is background (0) there."""
    background_p: float = 0.5
    """Probability that the background pixels (mask 0) take another picture's content."""
    background_edge: float = 0.012
    """Softness of the face's edge against the pasted background: sigma of the Gaussian that
    spreads the face's colours over the background pixels next to it, as a fraction of the side
    (0.8 px at 64 px; see :func:`replace_background`). Face pixels never change."""
    color_p: float = 0.8
    """Probability of the colour jitter."""
    color_strength: float = 0.3
    """Strength passed to :func:`dfmvr.data.transforms.color_jitter`: brightness, contrast and
    saturation factors in ``[1 - c, 1 + c]``, hue rotation within ``+-0.1 c`` turns (+-11 degrees
    at 0.3): white balance and exposure of other cameras, without turning skin green."""
    max_gamma: float = 0.25
    """Gamma drawn log-uniformly in ``[1 / (1 + g), 1 + g]`` (other tone curves)."""
    blur_p: float = 0.3
    """Probability of blurring."""
    blur_sigma: tuple[float, float] = (0.004, 0.02)
    """Range of the Gaussian blur's sigma as a fraction of the side (0.26..1.3 px at 64 px: from a
    soft lens to clear defocus at the parse net's size)."""
    motion_blur_p: float = 0.2
    """Probability that a blur is a motion blur (a straight streak at a random angle) instead of a
    Gaussian one."""
    motion_blur_length: float = 0.06
    """Longest motion streak as a fraction of the side (about 4 px at 64 px)."""
    noise_p: float = 0.4
    """Probability of sensor noise."""
    noise_sigma: tuple[float, float] = (1.0, 6.0)
    """Range of the Gaussian noise's standard deviation in uint8 levels (per pixel and channel)."""
    jpeg_p: float = 0.4
    """Probability of JPEG compression."""
    jpeg_quality: tuple[int, int] = (30, 95)
    """Range of the JPEG quality (1..100): heavily compressed web pictures to a camera's default."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength: expected a value in [0, 1], got {self.strength!r}")
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
        if not 0.0 <= self.max_scale_change <= 1.0:
            raise ValueError(f"max_scale_change: expected a value in [0, 1], got {self.max_scale_change!r}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg: expected degrees in [0, 180], got {self.max_rotation_deg!r}")
        if not 0.0 <= self.max_translation <= 0.5:
            raise ValueError(f"max_translation: expected a fraction of the side in [0, 0.5], got "
                             f"{self.max_translation!r}")
        if self.border not in BORDERS:
            raise ValueError(f"border: expected one of {list(BORDERS)}, got {self.border!r}")
        for name in ("background_edge", "color_strength", "max_gamma", "motion_blur_length"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name}: expected a finite value >= 0, got {value!r}")
        if self.color_strength > 1.0:
            raise ValueError(f"color_strength: expected a value in [0, 1], got {self.color_strength!r}")
        for name, upper in (("blur_sigma", 0.25), ("noise_sigma", 64.0)):
            self._check_range(name, 0.0, upper)
        self._check_range("jpeg_quality", 1, 100)
        if not all(isinstance(q, (int, np.integer)) for q in self.jpeg_quality):
            raise ValueError(f"jpeg_quality: expected two integers, got {self.jpeg_quality!r}")

    def _check_range(self, name: str, lower: float, upper: float) -> None:
        value = getattr(self, name)
        ok = isinstance(value, (tuple, list)) and len(value) == 2
        if ok:
            lo, hi = value
            ok = all(isinstance(v, (int, float, np.integer, np.floating)) for v in value) and lower <= lo <= hi <= upper
        if not ok:
            raise ValueError(f"{name}: expected (low, high) with {lower} <= low <= high <= {upper}, got {value!r}")
        object.__setattr__(self, name, tuple(value))


# --------------------------------------------------------------------------------- stages


def random_affine(rng: np.random.Generator, height: int, width: int, *, max_scale_change: float,
                  max_rotation_deg: float, max_translation: float) -> np.ndarray:
    """Draw one similarity transform about the image centre (zoom, then rotation, then shift).

    Args:
        rng: random generator (four uniform draws).
        height, width: image size in pixels.
        max_scale_change, max_rotation_deg, max_translation: as in :class:`AugmentSettings`,
            already scaled by the strength.

    Returns:
        float64 ``[2, 3]`` matrix mapping source pixel centres to output pixel centres (OpenCV's
        convention: pixel ``(i, j)`` sits at ``x = j, y = i``).
    """
    log_scale, angle, tx, ty = rng.uniform(-1.0, 1.0, size=4)
    scale = math.exp(log_scale * math.log1p(max_scale_change))
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle * max_rotation_deg, scale)
    side = min(height, width)
    matrix[:, 2] += (tx * max_translation * side, ty * max_translation * side)
    return matrix


def warp_view(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray,
              border: str = "reflect") -> tuple[np.ndarray, np.ndarray]:
    """Warp an image and its mask by the same affine map.

    Where the warp reaches outside the source, the mask is background (0) and the image takes
    the ``border`` mode's content, except where that content would be a mirrored or smeared piece
    of the face (renders' faces often touch the frame): there it takes the local mean colour of
    the background around it, so that no face-looking pixels are labelled background.

    Args:
        image: uint8 ``[H, W, 3]``; mask: uint8 ``[H, W]`` classes.
        matrix: ``[2, 3]`` source-to-output map (:func:`random_affine`).
        border: image border mode, a key of :data:`BORDERS`.

    Returns:
        ``(image, mask)``: the image resampled bilinearly; the mask by nearest neighbour (its
        classes never mix) with background (0) wherever the source has no pixel.
    """
    height, width = mask.shape
    size = (width, height)
    mode = BORDERS[border]
    out = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=mode)
    # classes shifted by one (in 16 bits, so 255 fits) so that 0 marks the pixels the source does not cover
    shifted = cv2.warpAffine(mask.astype(np.uint16) + np.uint16(1), matrix, size, flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    labels = (np.maximum(shifted, 1) - 1).astype(np.uint8)
    # bilinear footprints (not nearest samples) decide what the border brought in
    full = cv2.warpAffine(np.full(mask.shape, 255, np.uint8), matrix, size, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    bordering = full < 255
    if bordering.any():
        face = cv2.warpAffine((mask > 0).view(np.uint8) * np.uint8(255), matrix, size, flags=cv2.INTER_LINEAR,
                              borderMode=mode)
        stray = bordering & (face > 0) & (labels == 0)
        if stray.any():
            out = _fill_from_background(out, face == 0, stray)
    return out, labels


def _fill_from_background(image: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``image`` with the ``target`` pixels set to the mean of the ``source`` pixels in a window
    a quarter of the side wide around each (normalised box filter; the mean of all ``source``
    pixels where the window holds none)."""
    side = min(image.shape[:2])
    window = (max(3, side // 4) | 1,) * 2
    weight = source.astype(np.float32)
    total = cv2.boxFilter(image.astype(np.float32) * weight[..., None], -1, window, normalize=False)
    count = cv2.boxFilter(weight, -1, window, normalize=False)
    if source.any():
        fallback = image[source].mean(axis=0)
    else:
        fallback = image.reshape(-1, 3).mean(axis=0)
    local = np.where(count[..., None] > 0.5, total / np.maximum(count, 1e-6)[..., None], fallback)
    out = image.copy()
    out[target] = (local[target] + 0.5).astype(np.uint8)
    return out


def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A stand-in for a photo's background: a procedural background
    (:func:`dfmvr.data.backgrounds.random_background`) with a few random shapes on it (the edges
    and clutter of real scenes, which the smooth backgrounds lack).

    Returns:
        uint8 ``[size, size, 3]`` RGB.
    """
    # drawn at half size and enlarged: four times cheaper, and the shapes bring the fine detail
    base = random_background(rng, max(8, (size + 1) // 2))
    out = cv2.resize((base * 255.0 + 0.5).astype(np.uint8), (size, size), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(0, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(-size // 4, size + size // 4, size=4))
        if kind == 0:
            cv2.rectangle(out, (x0, y0), (x1, y1), colour, -1, lineType=cv2.LINE_AA)
        elif kind == 1:
            axes = (max(1, abs(x1 - x0) // 2), max(1, abs(y1 - y0) // 2))
            cv2.ellipse(out, (x0, y0), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, lineType=cv2.LINE_AA)
        else:
            thickness = max(1, int(rng.integers(1, max(2, size // 16))))
            cv2.line(out, (x0, y0), (x1, y1), colour, thickness, lineType=cv2.LINE_AA)
    return out


def background_fill(rng: np.random.Generator, height: int, width: int,
                    backgrounds: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """A new background: a random crop (40..100% of the shorter side, flipped half the time) of
    a random picture of ``backgrounds``, resized; or :func:`procedural_texture` when there are none.

    Args:
        backgrounds: uint8 ``[h, w, 3]`` RGB pictures of any size, or None / empty.

    Returns:
        uint8 ``[height, width, 3]``.
    """
    if not backgrounds:
        texture = procedural_texture(rng, max(height, width))
        return np.ascontiguousarray(texture[:height, :width])
    source = np.asarray(backgrounds[int(rng.integers(len(backgrounds)))])
    if source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3 or min(source.shape[:2]) < 1:
        raise ValueError(f"backgrounds: expected uint8 [h, w, 3] pictures, got {source.dtype} {list(source.shape)}")
    side = min(source.shape[:2])
    crop = max(1, int(round(side * rng.uniform(0.4, 1.0))))
    top = int(rng.integers(source.shape[0] - crop + 1))
    left = int(rng.integers(source.shape[1] - crop + 1))
    patch = source[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    interpolation = cv2.INTER_AREA if crop > max(height, width) else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(patch), (width, height), interpolation=interpolation)


def replace_background(image: np.ndarray, mask: np.ndarray, fill: np.ndarray, edge_sigma: float) -> np.ndarray:
    """Put ``fill`` behind the face, with a soft edge on the background side.

    Every background pixel (mask 0) becomes ``fill``, except next to the face, where it is a
    blend of ``fill`` and the face's own edge colour with the face's weight in the blurred face
    indicator: the face edge looks defocused or antialiased, as in a photo, instead of a cut-out
    whose hard seam lies exactly on the mask's outline. Nothing of the old background remains
    (a ring of it would outline the face just as well). Face pixels (mask > 0) are kept as they are.

    Args:
        image: uint8 ``[H, W, 3]``; mask: uint8 ``[H, W]``; fill: uint8 ``[H, W, 3]``.
        edge_sigma: sigma of the edge blur in pixels (0: a hard edge).

    Returns:
        uint8 ``[H, W, 3]``: ``image`` on every face pixel, ``fill`` or a blend on the others.
    """
    face = mask > 0
    out = fill.copy()
    if edge_sigma > 0 and face.any():
        weight = face.astype(np.float32)
        smooth = cv2.GaussianBlur(weight, (0, 0), sigmaX=edge_sigma, borderType=cv2.BORDER_REPLICATE)
        # the face's colours spread outwards: normalised convolution of the face pixels only
        spread = cv2.GaussianBlur(image.astype(np.float32) * weight[..., None], (0, 0), sigmaX=edge_sigma,
                                  borderType=cv2.BORDER_REPLICATE) / np.maximum(smooth, 1e-6)[..., None]
        alpha = (smooth * (1.0 - weight))[..., None]
        blend = spread * alpha + fill.astype(np.float32) * (1.0 - alpha)
        out = (np.clip(blend, 0.0, 255.0) + 0.5).astype(np.uint8)
    out[face] = image[face]
    return out


def jitter_colour(image: np.ndarray, strength: float, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue (:func:`dfmvr.data.transforms.color_jitter` on one
    view, its contrast pivoting about the view's mean luminance), then ``x ** gamma``.

    Returns:
        uint8 ``[H, W, 3]``.
    """
    out = color_jitter(image[None].astype(np.float32) * np.float32(1.0 / 255.0), strength, rng)[0]
    if gamma != 1.0:
        out = np.power(out, np.float32(gamma), out=out)
    return (out * 255.0 + 0.5).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` pixels (mirrored border); below 0.1 px, the image itself."""
    if sigma < 0.1:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)


def motion_blur(image: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    """Blur along a straight streak of ``length`` pixels at ``angle_deg`` (anti-aliased kernel)."""
    if length <= 1.0:
        return image
    size = int(math.ceil(length)) | 1
    oversample = 8
    canvas = np.zeros((size * oversample, size * oversample), np.float32)
    centre = (size * oversample - 1) / 2.0
    dx = 0.5 * (length - 1) * oversample * math.cos(math.radians(angle_deg))
    dy = 0.5 * (length - 1) * oversample * math.sin(math.radians(angle_deg))
    shift = 4  # cv2 drawing takes fixed-point coordinates with this many fractional bits
    points = [(int(round((centre + sx * dx) * (1 << shift))), int(round((centre + sx * dy) * (1 << shift))))
              for sx in (-1, 1)]
    cv2.line(canvas, points[0], points[1], 1.0, oversample, lineType=cv2.LINE_AA, shift=shift)
    kernel = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    kernel /= kernel.sum()
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of ``sigma`` uint8 levels on every pixel and channel (rounded, clipped)."""
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    out = image.astype(np.float32) + noise * np.float32(sigma)
    return np.clip(out + 0.5, 0.0, 255.0).astype(np.uint8)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` (OpenCV's libjpeg, 4:2:0 chroma) and decode again."""
    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"jpeg_roundtrip: OpenCV could not encode a {list(image.shape)} image")
    return np.ascontiguousarray(cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1])


# --------------------------------------------------------------------------------- the augmentation


class PhotoAugment:
    """Photo-like degradation of one view (see the module docstring for the stages and their order).

    Deterministic given ``rng``; with ``settings.strength == 0`` it returns its inputs and draws
    nothing. Holds no state besides the settings (safe to share between DataLoader workers).

    Args:
        settings: :class:`AugmentSettings` (default: the defaults).
    """

    def __init__(self, settings: AugmentSettings | None = None) -> None:
        self.settings = settings if settings is not None else AugmentSettings()

    def __repr__(self) -> str:
        return f"PhotoAugment({self.settings!r})"

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 backgrounds: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Augment one view.

        Args:
            image: uint8 ``[S, S, 3]`` RGB.
            mask: uint8 ``[S, S]`` classes 0..9 (0 background).
            rng: random generator (consumed in a fixed order).
            backgrounds: uint8 ``[h, w, 3]`` pictures to take new backgrounds from (e.g. other
                training views), or None for procedural textures.

        Returns:
            ``(image uint8 [S, S, 3], mask uint8 [S, S])``; the input arrays themselves where no stage
            changed them (inputs are never modified in place).
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"PhotoAugment: image must be uint8 [S, S, 3], got {image.dtype} {list(image.shape)}")
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
            raise ValueError(f"PhotoAugment: mask must be uint8 {list(image.shape[:2])}, got {mask.dtype} "
                             f"{list(mask.shape)}")
        s = self.settings
        k = s.strength
        if k == 0:
            return image, mask
        height, width = mask.shape
        side = min(height, width)

        if rng.random() < s.geometry_p:
            matrix = random_affine(rng, height, width, max_scale_change=k * s.max_scale_change,
                                   max_rotation_deg=k * s.max_rotation_deg, max_translation=k * s.max_translation)
            image, mask = warp_view(image, mask, matrix, s.border)
        if rng.random() < k * s.background_p:
            fill = background_fill(rng, height, width, backgrounds)
            image = replace_background(image, mask, fill, s.background_edge * side)
        if rng.random() < s.color_p:
            gamma = math.exp(rng.uniform(-1.0, 1.0) * k * math.log1p(s.max_gamma))
            image = jitter_colour(image, k * s.color_strength, gamma, rng)
        if rng.random() < s.blur_p:
            if rng.random() < s.motion_blur_p:
                length = rng.uniform(0.3, 1.0) * k * s.motion_blur_length * side
                image = motion_blur(image, length, rng.uniform(0.0, 180.0))
            else:
                image = gaussian_blur(image, rng.uniform(*s.blur_sigma) * k * side)
        if rng.random() < s.noise_p:
            image = add_noise(image, rng.uniform(*s.noise_sigma) * k, rng)
        if rng.random() < s.jpeg_p:
            low, high = (100.0 - k * (100.0 - q) for q in s.jpeg_quality)
            image = jpeg_roundtrip(image, int(round(rng.uniform(low, high))))
        return image, mask


def augment_views(images: torch.Tensor, masks: torch.Tensor, augment: PhotoAugment, rng: np.random.Generator,
                  backgrounds: Sequence[np.ndarray] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch of single views, as the parse net's training takes them.

    The images go to uint8 (``round((x + 1) * 127.5)``), through ``augment`` one by one (on the
    CPU, in order, so the result is a function of ``rng``'s state), and back with
    :func:`dfmvr.data.transforms.to_model_range` (``u / 127.5 - 1``): images that came from uint8
    come back bit-identical where nothing changed them.

    Args:
        images: float ``[N, 3, S, S]`` RGB in [-1, 1].
        masks: integer ``[N, S, S]`` classes 0..9.
        augment: the per-view augmentation.
        rng: random generator.
        backgrounds: uint8 ``[h, w, 3]`` pictures for background replacement, or None.

    Returns:
        ``(images, masks)`` with the inputs' shapes, dtypes and device; the inputs themselves when
        ``augment.settings.strength == 0``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"augment_views: images must be float [N, 3, S, S], got {images.dtype} {list(images.shape)}")
    if masks.shape != (images.shape[0], *images.shape[2:]) or masks.is_floating_point():
        raise ValueError(f"augment_views: masks must be integer {[images.shape[0], *images.shape[2:]]}, got "
                         f"{masks.dtype} {list(masks.shape)}")
    if augment.settings.strength == 0 or images.shape[0] == 0:
        return images, masks
    labels = masks.detach().cpu()
    if int(labels.min()) < 0 or int(labels.max()) > 255:
        raise ValueError(f"augment_views: masks hold classes {int(labels.min())}..{int(labels.max())}, expected 0..255")
    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    labels = labels.to(torch.uint8).numpy()
    out_images = np.empty_like(pixels)
    out_masks = np.empty_like(labels)
    for n in range(pixels.shape[0]):
        out_images[n], out_masks[n] = augment(pixels[n], labels[n], rng, backgrounds)
    new_images = torch.from_numpy(to_model_range(out_images)).to(device=images.device, dtype=images.dtype)
    new_masks = torch.from_numpy(out_masks).to(device=masks.device, dtype=masks.dtype)
    return new_images, new_masks


__all__ = [
    "BORDERS",
    "AugmentSettings",
    "PhotoAugment",
    "add_noise",
    "augment_views",
    "background_fill",
    "gaussian_blur",
    "jitter_colour",
    "jpeg_roundtrip",
    "motion_blur",
    "procedural_texture",
    "random_affine",
    "replace_background",
    "warp_view",
]
