"""mmpose 0.x BottomUpRandomAffine + BottomUpRandomFlip, and the train sizes.

Where each piece runs (measured in bench/bench_pipeline.py, one core):
  * JPEG decode (coco.decode_image), the two warps and the flip here run
    in cv2/numpy on the host, in the input worker processes (the loader
    built by example_loader.make_loader, run per example by
    pipeline.py's workers); it is the decoder/warp mmpose uses, so images
    and masks match mmpose exactly. The targets are rendered on device
    from the keypoints returned here (device_targets.py). tf.io.decode_jpeg
    differs from cv2 (other chroma upsampling, up to 19 levels) and
    tf.raw_ops.ImageProjectiveTransformV3 was 6x slower than
    cv2.warpAffine for a 512x512x3 output (7.7 vs 1.3 ms).
  * The random parameters are drawn from stateless seeds
    (pipeline.sample_augmentation: TF's stateless ops, bit for bit, in
    numpy), so a (seed, example position) pair fixes them;
    `shift_from_uniform` maps the drawn uniforms to mmpose's integer
    center shift on the host.
  * Images stay uint8 on the host: the ImageNet normalisation runs on
    device in the train step (models/ae_model.normalize_images), which
    beat both TF ops (~5 ms per 512x512 image on one core) and a cv2.LUT
    table, and makes host copies and transfers 4x smaller.

Order of operations (mmpose): the affine is built twice from one random
draw, for the image at input size S and for mask/joints at heatmap size h;
the image is warped from the decoded RGB uint8, the ignore mask is warped
from full resolution straight to the map size (bilinear, border 0, then
> 0.5); joints are mapped with the map-size matrix; then the flip mirrors
image, mask and joints (x -> w - 1 - x with w the map width, left/right
swap).

Sizes: config.data.input_size / heatmap_size are an int (square, the paper
setup) or a (w, h) pair as mmpose's image_size / heatmap_size; they are
normalised once, to (w, h) pairs, by `train_sizes` (which also checks the
heatmap size), and the warps below take the pairs. The box is mmpose's
`_get_scale` for that aspect ratio.

Shapes: image [Hi, Wi, 3] uint8 RGB in, [H, W, 3] uint8 out (input size);
mask [h, w] uint8 {0, 1} (1 = train on this pixel); keypoints [P, K, 3]
float32 (x, y, v), output in heatmap pixels.
"""

import dataclasses

import cv2
import numpy as np

from ae_jax import keypoints as keypoints_lib
from ae_jax.data import affine


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


def as_wh(size) -> tuple[int, int]:
  """A size as (w, h): an int is square (the paper setup), else a pair.

  Args:
    size: int side, or (w, h) (mmpose's image_size / heatmap_size order).

  Returns:
    (w, h) ints.
  """
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  try:
    w, h = size
  except (TypeError, ValueError):
    raise ValueError(
        f'A size is an int or a (w, h) pair, got {size!r}') from None
  return int(w), int(h)


HEATMAP_STRIDE = 4  # input px per heatmap px: the model's output stride.


def train_sizes(input_size, heatmap_size):
  """Normalises the train sizes once: ((W, H), (w, h)), validated.

  Args:
    input_size: config.data.input_size, int S or (W, H).
    heatmap_size: config.data.heatmap_size, int h or (w, h); must be the
      input size / HEATMAP_STRIDE (the map size the model predicts).

  Returns:
    ((W, H), (w, h)) ints.

  Raises:
    ValueError: a size is malformed, or the heatmap size is not the input
      size / 4 (named as its config key).
  """
  in_wh, hm_wh = as_wh(input_size), as_wh(heatmap_size)
  want = tuple(s / HEATMAP_STRIDE for s in in_wh)
  if hm_wh != want:
    raise ValueError(
        f'config.data.heatmap_size {heatmap_size!r} must be input_size '
        f'{input_size!r} / {HEATMAP_STRIDE} = ({want[0]:g}, {want[1]:g}) '
        f'(w, h): the model predicts heatmaps at stride {HEATMAP_STRIDE}')
  return in_wh, hm_wh


def box_width(img_w: float, img_h: float, out_w: int, out_h: int,
              scale_type: str) -> float:
  """Width (px) of the image box that maps onto a (out_w, out_h) output.

  mmpose BottomUpRandomAffine._get_scale: the box has the output's aspect
  ratio and fits the scaled image by its short ('short': the box lies inside
  the image, cropping the other axis) or long ('long': the image lies inside
  the box, padding the other axis) side. Only the width enters
  get_affine_transform. The aspect factor is applied as one ratio, which is
  exactly 1.0 for a square output, so the square box is the image side
  itself, bit for bit.
  """
  if scale_type not in ('short', 'long'):
    raise ValueError(f'Unknown scale_type {scale_type!r}: short or long')
  # True when the image is relatively taller than the output.
  taller = img_w / out_w < img_h / out_h
  if taller == (scale_type == 'long'):
    return img_h * (out_w / out_h)  # the box height is the image height
  return img_w


def affine_matrices(height: int, width: int, aug: AugParams,
                    input_wh: tuple[int, int], heatmap_wh: tuple[int, int],
                    scale_type: str = 'short') -> tuple[np.ndarray, ...]:
  """mmpose's two warp matrices: image -> input px, image -> heatmap px.

  Args:
    height: image height (px).
    width: image width (px).
    aug: augmentation parameters.
    input_wh: network input (W, H).
    heatmap_wh: target map (w, h).
    scale_type: 'short' or 'long' (BottomUpRandomAffine._get_scale).

  Returns:
    (mat_input, mat_heatmap), each [2, 3] float64 for cv2.warpAffine.
  """
  center = np.array([width / 2.0 + aug.dx, height / 2.0 + aug.dy])
  img_w, img_h = width * aug.scale, height * aug.scale
  mats = []
  for size in (input_wh, heatmap_wh):
    # mmpose computes the box per output size (their aspects may differ).
    side = box_width(img_w, img_h, size[0], size[1], scale_type)
    box = np.array([side, side * size[1] / size[0]]) / affine.PIXEL_STD
    mats.append(affine.get_affine_transform(center, box, aug.rot, size))
  return mats[0], mats[1]


def transform_example(image: np.ndarray, ignore_mask: np.ndarray,
                      keypoints: np.ndarray, aug: AugParams,
                      input_wh: tuple[int, int], heatmap_wh: tuple[int, int],
                      scale_type: str = 'short',
                      flip_index=keypoints_lib.COCO.flip_index):
  """Random affine + flip with explicit parameters (host numpy/cv2).

  Args:
    image: [H, W, 3] uint8 RGB.
    ignore_mask: [H, W] uint8, 1 over ignore regions.
    keypoints: [P, K, 3] float32 in image pixels.
    aug: augmentation parameters.
    input_wh: network input (W, H).
    heatmap_wh: target map (w, h).
    scale_type: 'short' or 'long'.
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index).

  Returns:
    image [H, W, 3] uint8 (input size), mask [h, w] uint8 (1 = valid),
    keypoints [P, K, 3] float32 in heatmap pixels.
  """
  height, width = image.shape[:2]
  in_wh, hm_wh = tuple(input_wh), tuple(heatmap_wh)
  mat_in, mat_hm = affine_matrices(height, width, aug, in_wh, hm_wh,
                                   scale_type)
  out = cv2.warpAffine(image, mat_in, in_wh, flags=cv2.INTER_LINEAR)
  # mmpose warps (valid * 255) as uint8 and thresholds the result at 0.5.
  valid = (1 - ignore_mask) * np.uint8(255)
  mask = cv2.warpAffine(valid, mat_hm, hm_wh, flags=cv2.INTER_LINEAR)
  mask = (mask > 127).view(np.uint8)  # mask / 255 > 0.5 on uint8 levels
  joints = np.array(keypoints, np.float32, copy=True)
  # mmpose stores the warped float64 points back into a float32 array.
  joints[..., :2] = affine.warp_points(joints[..., :2], mat_hm)
  if aug.flip:
    # cv2.flip is the same mirror as [:, ::-1] copied, ~20x faster than
    # numpy's strided copy for 512x512x3 (0.1 vs 1.9 ms) and GIL-free.
    out, mask = cv2.flip(out, 1), cv2.flip(mask, 1)
    joints = joints[:, np.asarray(flip_index)]
    joints[..., 0] = hm_wh[0] - joints[..., 0] - 1  # mirror in map width
  return out, mask, joints
