"""Draws detected people (skeleton lines and joint dots) with cv2.

`draw_poses` draws on one image; `annotate_images` runs a predictor over
image files and writes the drawings as PNGs (demo.py).

Shapes: image [H, W, 3] uint8 RGB; poses [P, K, 3] float32 (x, y image px,
joint score); scores [P].
"""

import os
from typing import Callable, List, Sequence, Tuple

from absl import logging
import cv2
import numpy as np

from ae_jax import keypoints
from ae_jax.data import coco

# One colour per person (RGB), cycled.
_PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
    [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                    np.uint8)


def draw_poses(image: np.ndarray, poses: np.ndarray, scores: np.ndarray,
               joint_threshold: float = 0.1,
               person_threshold: float = 0.0,
               skeleton=keypoints.COCO.skeleton) -> np.ndarray:
  """Returns a copy of `image` with each person's skeleton drawn.

  Args:
    image: [H, W, 3] uint8 RGB.
    poses: [P, K, 3] (x, y, score) in image pixels.
    scores: [P] person scores; people at or below person_threshold are
      skipped.
    joint_threshold: joints (and limbs touching them) with a score at or
      below this are not drawn.
    person_threshold: see scores.
    skeleton: limbs as 0-based joint pairs (KeypointSpec.skeleton).
  """
  canvas = np.ascontiguousarray(image, np.uint8).copy()
  thickness = max(1, round(max(image.shape[:2]) / 300))
  for p, (pose, score) in enumerate(zip(poses, scores)):
    if score <= person_threshold:
      continue
    color = tuple(int(c) for c in _PALETTE[p % len(_PALETTE)])
    points = np.round(pose[:, :2]).astype(np.int32)
    visible = pose[:, 2] > joint_threshold
    for a, b in skeleton:
      if visible[a] and visible[b]:
        cv2.line(canvas, tuple(map(int, points[a])), tuple(map(int, points[b])),
                 color, thickness, cv2.LINE_AA)
    for k in np.nonzero(visible)[0]:
      cv2.circle(canvas, tuple(map(int, points[k])), thickness + 2, color, -1,
                 cv2.LINE_AA)
  return canvas


def annotate_images(
    predict_fn: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]],
    paths: Sequence[str], out_dir: str,
    person_threshold: float = 0.2,
    skeleton=keypoints.COCO.skeleton) -> List[str]:
  """Draws each image's people into {out_dir}/{file stem}.png.

  Args:
    predict_fn: [H, W, 3] uint8 RGB -> (poses [P, K, 3], scores [P]), e.g.
      an inference.Predictor.
    paths: image files.
    out_dir: created if missing.
    person_threshold: people scoring at or below this are not drawn.
    skeleton: limbs as 0-based joint pairs (KeypointSpec.skeleton).

  Returns:
    The paths that could not be read (each logged with the reason).
  """
  os.makedirs(out_dir, exist_ok=True)
  failed = []
  for path in paths:
    try:
      image = coco.decode_image(path)
    except coco.ImageError as e:
      logging.error('%s', e)
      failed.append(path)
      continue
    poses, scores = predict_fn(image)
    canvas = draw_poses(image, poses, scores,
                        person_threshold=person_threshold,
                        skeleton=skeleton)
    stem = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(out_dir, stem + '.png')
    cv2.imwrite(out, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    logging.info('%s: %d people -> %s', path,
                 int((scores > person_threshold).sum()), out)
  return failed
