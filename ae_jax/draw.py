"""Draws detected people (skeleton lines and joint dots) with cv2.

Shapes: image [H, W, 3] uint8 RGB; poses [P, K, 3] float32 (x, y image px,
joint score); scores [P].
"""

import cv2
import numpy as np

from ae_jax import keypoints

# One colour per person (RGB), cycled.
_PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
    [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                    np.uint8)


def draw_poses(image: np.ndarray, poses: np.ndarray, scores: np.ndarray,
               joint_threshold: float = 0.1,
               person_threshold: float = 0.0) -> np.ndarray:
  """Returns a copy of `image` with each person's skeleton drawn.

  Args:
    image: [H, W, 3] uint8 RGB.
    poses: [P, K, 3] (x, y, score) in image pixels.
    scores: [P] person scores; people at or below person_threshold are
      skipped.
    joint_threshold: joints (and limbs touching them) with a score at or
      below this are not drawn.
    person_threshold: see scores.
  """
  canvas = np.ascontiguousarray(image, np.uint8).copy()
  thickness = max(1, round(max(image.shape[:2]) / 300))
  for p, (pose, score) in enumerate(zip(poses, scores)):
    if score <= person_threshold:
      continue
    color = tuple(int(c) for c in _PALETTE[p % len(_PALETTE)])
    points = np.round(pose[:, :2]).astype(np.int32)
    visible = pose[:, 2] > joint_threshold
    for a, b in keypoints.SKELETON:
      if visible[a] and visible[b]:
        cv2.line(canvas, tuple(map(int, points[a])), tuple(map(int, points[b])),
                 color, thickness, cv2.LINE_AA)
    for k in np.nonzero(visible)[0]:
      cv2.circle(canvas, tuple(map(int, points[k])), thickness + 2, color, -1,
                 cv2.LINE_AA)
  return canvas
