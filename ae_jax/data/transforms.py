"""mmpose 0.x BottomUpRandomAffine + BottomUpRandomFlip, and normalisation.

Where each piece runs (measured in bench/bench_pipeline.py, one core):
  * JPEG decode and the two warps run in cv2 on the host inside one
    `tf.numpy_function` (`load_and_transform`): cv2 releases the GIL in
    imdecode/warpAffine, so tf.data's parallel map still scales, and it is
    the decoder/warp mmpose uses, so images and masks match mmpose exactly.
    tf.io.decode_jpeg differs from cv2 (other chroma upsampling, up to 19
    levels) and tf.raw_ops.ImageProjectiveTransformV3 was 6x slower than
    cv2.warpAffine for a 512x512x3 output (7.7 vs 1.3 ms).
  * The random parameters are drawn in TF from stateless seeds
    (`sample_augmentation`), so a (seed, example position) pair fixes them.
  * Targets run in the same host function with the numpy twins in
    targets.py (0.5 ms for 6 people vs 2-3 ms for the TF-graph versions,
    whose scatters cost ~110 ns per update).
  * Normalisation is a 256-entry per-channel float32 table applied with
    cv2.LUT (`normalize_image_np`): bit-identical to mmpose's float32
    (x / 255 - mean) / std and ~10x cheaper than the same TF ops, whose
    [3]-vector broadcasts took ~5 ms per 512x512 image on one core.

Order of operations (mmpose): the affine is built twice from one random
draw, for the image at input size S and for mask/joints at heatmap size h;
the image is warped from the decoded RGB uint8, the ignore mask is warped
from full resolution straight to h x h (bilinear, border 0, then > 0.5);
joints are mapped with the h-size matrix; then the flip mirrors image, mask
and joints (x -> h - 1 - x, left/right swap).

Shapes: image [H, W, 3] uint8 RGB in, [S, S, 3] uint8 out; mask [h, h]
float32 {0, 1} (1 = train on this pixel); keypoints [P, K, 3] float32
(x, y, v), output in heatmap pixels.
"""

import dataclasses

import cv2
import numpy as np

from ae_jax.data import affine
from ae_jax.keypoints import FLIP_INDEX, IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class AugParams:
  """Explicit augmentation parameters for one example.

  Attributes:
    rot: rotation in degrees (mmpose aug_rot).
    scale: zoom factor on the image box (mmpose aug_scale).
    dx: center shift in image pixels (integer as mmpose's randint).
    dy: center shift in image pixels.
    flip: mirror horizontally after the affine.
  """
  rot: float = 0.0
  scale: float = 1.0
  dx: float = 0.0
  dy: float = 0.0
  flip: bool = False


def translation_range(size: float, aug_scale: float,
                      trans_factor: float) -> tuple[int, int]:
  """[low, high) of mmpose's np.random.randint center shift for one axis.

  mmpose calls randint(-t * s / 200, t * s / 200) with s the scaled image
  side; numpy truncates both float bounds toward zero.
  """
  bound = trans_factor * size * aug_scale / 200.0
  low, high = int(-bound), int(bound)
  return low, max(high, low + 1)


def shift_from_uniform(u: float, size: float, aug_scale: float,
                       trans_factor: float) -> int:
  """Maps u ~ U[0, 1) to an integer shift uniform on translation_range."""
  if trans_factor <= 0:
    return 0
  low, high = translation_range(size, aug_scale, trans_factor)
  return int(min(low + np.floor(u * (high - low)), high - 1))


def affine_matrices(height: int, width: int, aug: AugParams, input_size: int,
                    heatmap_size: int,
                    scale_type: str = 'short') -> tuple[np.ndarray, ...]:
  """mmpose's two warp matrices: image -> input px, image -> heatmap px.

  Args:
    height: image height (px).
    width: image width (px).
    aug: augmentation parameters.
    input_size: S, square network input side.
    heatmap_size: h, square target side.
    scale_type: 'short' or 'long' (BottomUpRandomAffine._get_scale).

  Returns:
    (mat_input, mat_heatmap), each [2, 3] float64 for cv2.warpAffine.
  """
  center = np.array([width / 2.0 + aug.dx, height / 2.0 + aug.dy])
  img_w, img_h = width * aug.scale, height * aug.scale
  # _get_scale with a square output: the box side is the short (or long)
  # side of the scaled image; only the width enters get_affine_transform.
  if scale_type == 'short':
    side = min(img_w, img_h)
  elif scale_type == 'long':
    side = max(img_w, img_h)
  else:
    raise ValueError(f'Unknown scale_type {scale_type!r}: short or long')
  box = np.array([side, side]) / affine.PIXEL_STD
  mats = [affine.get_affine_transform(center, box, aug.rot, (size, size))
          for size in (input_size, heatmap_size)]
  return mats[0], mats[1]


def transform_example(image: np.ndarray, ignore_mask: np.ndarray,
                      keypoints: np.ndarray, aug: AugParams, input_size: int,
                      heatmap_size: int, scale_type: str = 'short'):
  """Random affine + flip with explicit parameters (host numpy/cv2).

  Args:
    image: [H, W, 3] uint8 RGB.
    ignore_mask: [H, W] uint8, 1 over ignore regions.
    keypoints: [P, K, 3] float32 in image pixels.
    aug: augmentation parameters.
    input_size: S.
    heatmap_size: h.
    scale_type: 'short' or 'long'.

  Returns:
    image [S, S, 3] uint8, mask [h, h] float32 (1 = valid),
    keypoints [P, K, 3] float32 in heatmap pixels.
  """
  height, width = image.shape[:2]
  mat_in, mat_hm = affine_matrices(height, width, aug, input_size,
                                   heatmap_size, scale_type)
  out = cv2.warpAffine(image, mat_in, (input_size, input_size),
                       flags=cv2.INTER_LINEAR)
  # mmpose warps (valid * 255) as uint8 and thresholds the result at 0.5.
  valid = (1 - ignore_mask) * np.uint8(255)
  mask = cv2.warpAffine(valid, mat_hm, (heatmap_size, heatmap_size),
                        flags=cv2.INTER_LINEAR)
  mask = (mask / 255.0 > 0.5).astype(np.float32)
  joints = np.array(keypoints, np.float32, copy=True)
  # mmpose stores the warped float64 points back into a float32 array.
  joints[..., :2] = affine.warp_points(joints[..., :2], mat_hm)
  if aug.flip:
    out = out[:, ::-1]
    mask = mask[:, ::-1]
    joints = joints[:, FLIP_INDEX]
    joints[..., 0] = heatmap_size - joints[..., 0] - 1
  return (np.ascontiguousarray(out), np.ascontiguousarray(mask), joints)


def sample_augmentation(seed, rot_factor: float, scale_factor, flip_prob: float,
                        augment: bool = True):
  """Draws one example's parameters from a stateless seed (TF).

  The center shift depends on the image size, so it is drawn as two
  uniforms in [0, 1) that `shift_from_uniform` maps on the host.

  Args:
    seed: [2] int32/int64 stateless seed.
    rot_factor: max |rotation| in degrees.
    scale_factor: (min, max) zoom.
    flip_prob: probability of a horizontal flip.
    augment: if False, the identity (rot 0, scale 1, centered, no flip).

  Returns:
    float32 tensors: rot, scale, u_dx, u_dy, flip (0/1).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  u = tf.random.stateless_uniform([5], seed=seed, dtype=tf.float32)
  if not augment:
    return (tf.constant(0.), tf.constant(1.), tf.constant(0.5),
            tf.constant(0.5), tf.constant(0.))
  lo, hi = float(scale_factor[0]), float(scale_factor[1])
  rot = (u[0] * 2.0 - 1.0) * rot_factor
  scale = u[1] * (hi - lo) + lo
  flip = tf.cast(u[4] < flip_prob, tf.float32)
  return rot, scale, u[2], u[3], flip


# [256, 3] float32: the normalised value of each uint8 level per channel,
# computed with mmpose's float32 operation order.
_NORM_TABLE = ((np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
                - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def normalize_image_np(image: np.ndarray) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> float32 ImageNet-normalised, via cv2.LUT."""
  return cv2.LUT(image, _NORM_TABLE.reshape(256, 1, 3))


def normalize_image(image):
  """uint8 RGB [..., 3] -> float32 (x / 255 - mean) / std, as mmpose (TF)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.cast(image, tf.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD
