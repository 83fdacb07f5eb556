"""OpenCV 4.x `warpAffine` (INTER_LINEAR, BORDER_CONSTANT 0) in numpy.

Written from the fixed-point scheme of OpenCV 4's imgwarp.cpp (4.x branch),
not from its code: the [2, 3] matrix is inverted in float64 (dst -> src);
per output pixel the source position is computed in 1/1024 px fixed point
(AB_BITS 10), rounded to 1/32 px (INTER_BITS 5); the bilinear weights of
that 1/32 px phase are integers in 1/32768 units (INTER_REMAP_COEF_BITS 15,
saturated to int16, so the integer-aligned phase weighs 32767) and the
weighted sum of the four uint8 neighbours is rounded with
(sum + 2^14) >> 15. Neighbours outside the image count as 0 (the border).
OpenCV 5 computes the bilinear warp in float32 instead, so it differs from
this on a few percent of the pixels by up to a few levels.

Shapes: image [H, W] or [H, W, C] uint8; matrix [2, 3]; dsize (w, h).
"""

import numpy as np

_AB_BITS = 10
_INTER_BITS = 5
_TAB = 1 << _INTER_BITS          # 32 phases per pixel and axis
_COEF_BITS = 15


def _invert(matrix: np.ndarray) -> np.ndarray:
  """cv2.invertAffineTransform in float64, as warpAffine does internally."""
  m = np.asarray(matrix, np.float64).reshape(6)
  det = m[0] * m[4] - m[1] * m[3]
  d = 1.0 / det if det != 0 else 0.0
  a11, a22 = m[4] * d, m[0] * d
  a12, a21 = -m[1] * d, -m[3] * d
  b1 = -a11 * m[2] - a12 * m[5]
  b2 = -a21 * m[2] - a22 * m[5]
  return np.array([a11, a12, b1, a21, a22, b2])


def _weights() -> np.ndarray:
  """[32 * 32, 4] int64 weights (S00, S01, S10, S11) per (ay, ax) phase."""
  f = np.arange(_TAB) / _TAB
  wx = np.stack([1 - f, f], -1)  # [32, 2]
  w = (wx[:, None, :, None] * wx[None, :, None, :])  # [ay, ax, 2, 2]
  # Products of multiples of 1/32 scaled by 2^15 are exact integers; only
  # the 1.0 weight overflows int16 and saturates to 32767.
  w = np.minimum(np.rint(w * (1 << _COEF_BITS)), 32767)
  return w.reshape(_TAB * _TAB, 4).astype(np.int64)


def warp_affine(image: np.ndarray, matrix: np.ndarray,
                dsize: tuple[int, int]) -> np.ndarray:
  """What OpenCV 4's cv2.warpAffine(image, matrix, dsize) returns."""
  image = np.asarray(image)
  assert image.dtype == np.uint8, image.dtype
  squeeze = image.ndim == 2
  src = image[..., None] if squeeze else image
  height, width = src.shape[:2]
  out_w, out_h = dsize
  m = _invert(matrix)
  scale = 1 << _AB_BITS
  round_delta = scale // _TAB // 2
  xs = np.arange(out_w, dtype=np.float64)
  ys = np.arange(out_h, dtype=np.float64)
  # cvRound (half to even) of each term, as the per-column / per-row tables.
  adelta = np.rint(m[0] * xs * scale).astype(np.int64)
  bdelta = np.rint(m[3] * xs * scale).astype(np.int64)
  x0 = np.rint((m[1] * ys + m[2]) * scale).astype(np.int64) + round_delta
  y0 = np.rint((m[4] * ys + m[5]) * scale).astype(np.int64) + round_delta
  fx = (x0[:, None] + adelta[None, :]) >> (_AB_BITS - _INTER_BITS)
  fy = (y0[:, None] + bdelta[None, :]) >> (_AB_BITS - _INTER_BITS)
  sx, sy = fx >> _INTER_BITS, fy >> _INTER_BITS  # floor
  w = _weights()[(fy & (_TAB - 1)) * _TAB + (fx & (_TAB - 1))]  # [h, w, 4]
  padded = np.zeros((height + 2, width + 2, src.shape[2]), np.int64)
  padded[1:-1, 1:-1] = src

  def tap(dy, dx):
    yy, xx = sy + dy, sx + dx
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    yy = np.clip(yy, -1, height) + 1
    xx = np.clip(xx, -1, width) + 1
    return np.where(inside[..., None], padded[yy, xx], 0)

  acc = (tap(0, 0) * w[..., 0:1] + tap(0, 1) * w[..., 1:2] +
         tap(1, 0) * w[..., 2:3] + tap(1, 1) * w[..., 3:4])
  out = np.clip((acc + (1 << (_COEF_BITS - 1))) >> _COEF_BITS, 0, 255)
  out = out.astype(np.uint8)
  return out[..., 0] if squeeze else out
