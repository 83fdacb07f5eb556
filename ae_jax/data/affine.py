"""mmpose's affine conventions in closed form (numpy, no cv2).

mmpose builds its warps with `get_affine_transform(center, scale, rot,
output_size)`: the box of size `scale * 200` px around `center`, rotated by
`rot` degrees, maps onto an output of `output_size` (w, h) px. That is a
similarity: p -> s * R(-rot) (p - center) + output_size / 2 with
s = output_w / (scale_w * 200). We write it directly instead of solving
cv2.getAffineTransform on three points; the two agree to float precision.

Shapes: center [2] (x, y) px, scale [2] (w, h) in units of 200 px,
matrices [2, 3] float64 (cv2.warpAffine layout), points [..., 2].
"""

import numpy as np

PIXEL_STD = 200.0  # mmpose's scale unit.


def get_affine_transform(center, scale, rot: float,
                         output_size) -> np.ndarray:
  """Returns the [2, 3] matrix mapping image px -> output px.

  Args:
    center: [2] box center (x, y) in image pixels.
    scale: [2] box size (w, h) in units of 200 px; only w sets the zoom.
    rot: rotation in degrees (counter-clockwise in the image as mmpose).
    output_size: (w, h) of the output in pixels.
  """
  center = np.asarray(center, np.float64)
  out_w, out_h = float(output_size[0]), float(output_size[1])
  s = out_w / (float(np.asarray(scale)[0]) * PIXEL_STD)
  theta = np.deg2rad(rot)
  cos, sin = np.cos(theta), np.sin(theta)
  # R(-rot) scaled: image -> output.
  lin = s * np.array([[cos, sin], [-sin, cos]])
  half = np.array([out_w * 0.5, out_h * 0.5])
  return np.concatenate([lin, (half - lin @ center)[:, None]], 1)


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Applies a [2, 3] affine matrix to points [..., 2] (x, y)."""
  points = np.asarray(points, np.float64)
  return points @ matrix[:, :2].T + matrix[:, 2]
