"""mmpose 0.x bottom-up train pipeline, written from its description.

An independent numpy + cv2 reference (it shares no code with ae_jax/data):
mmcv decode (cv2 BGR -> RGB), `BottomUpCocoDataset._get_mask` (sum of the
decoded crowd / no-keypoint masks, valid = m < 0.5), the 3-point
`get_affine_transform` on float32 points with cv2.getAffineTransform,
`BottomUpRandomAffine` (`_get_scale`, cv2.warpAffine of the image at input
size and of valid * 255 at heatmap size, then > 0.5, joints mapped with the
heatmap matrix), `BottomUpRandomFlip` (after the affine, mirrored in the map
width, left/right swapped), ToTensor + NormalizeTensor, and the
`HeatmapGenerator` / `JointsEncoder` loops.

The tests compare ae_jax's pipeline against it (tests/test_data_*.py,
tests/test_affine.py); bench/bench_pipeline.py times it as the mmpose-style
baseline.

Shapes: image [H, W, 3] uint8 RGB; anns: COCO annotation dicts of one
image; joints [P, K, 3] float32 (x, y, v); sizes (w, h).
"""

import cv2
import numpy as np
from pycocotools import mask as mask_api

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# COCO left/right pairs (mmpose flip_index), written out independently.
FLIP_INDEX = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]


def read_rgb(path: str) -> np.ndarray:
  """mmcv-style decode: cv2 BGR, converted to RGB."""
  with open(path, 'rb') as f:
    buf = np.frombuffer(f.read(), np.uint8)
  return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def get_affine_transform(center, scale, rot, output_size):
  """mmpose get_affine_transform: 3 float32 point pairs, cv2 solves.

  scale is the box (w, h) in units of 200 px; only its width sets the zoom.
  """
  src_w = np.asarray(scale)[0] * 200.0
  dst_w, dst_h = output_size
  r = np.pi * rot / 180
  sn, cs = np.sin(r), np.cos(r)
  src_dir = np.array([-(src_w * -0.5) * sn, (src_w * -0.5) * cs])
  dst_dir = np.array([0.0, dst_w * -0.5])
  third = lambda a, b: b + np.array([-(a - b)[1], (a - b)[0]])
  src = np.zeros((3, 2), np.float32)
  dst = np.zeros((3, 2), np.float32)
  src[0] = center
  src[1] = src[0] + src_dir
  src[2] = third(src[0], src[1])
  dst[0] = (dst_w * 0.5, dst_h * 0.5)
  dst[1] = dst[0] + dst_dir
  dst[2] = third(dst[0], dst[1])
  return cv2.getAffineTransform(src, dst)


def get_scale(img_scale, out_size, scale_type):
  """BottomUpRandomAffine._get_scale: box (w, h) px, float32 as mmpose."""
  w, h = img_scale
  w_out, h_out = out_size
  if w / w_out < h / h_out:
    if scale_type == 'long':
      box = (h / h_out * w_out, h)
    else:
      box = (w, w / w_out * h_out)
  else:
    if scale_type == 'long':
      box = (w, w / w_out * h_out)
    else:
      box = (h / h_out * w_out, h)
  return np.array(box, np.float32)


def valid_mask(anns, height: int, width: int) -> np.ndarray:
  """_get_mask: sum of decoded crowd / no-keypoint masks; valid = m < 0.5."""
  m = np.zeros((height, width), np.float32)
  for obj in anns:
    if obj['iscrowd'] or obj['num_keypoints'] == 0:
      rles = mask_api.frPyObjects(obj['segmentation'], height, width)
      for rle in rles if isinstance(rles, list) else [rles]:
        m += mask_api.decode(rle)
  return m < 0.5


def people_joints(anns) -> np.ndarray:
  """Joints [P, 17, 3] float32 of the people mmpose trains on."""
  people = [a for a in anns if a['iscrowd'] == 0 or a['num_keypoints'] > 0]
  joints = np.zeros((len(people), 17, 3), np.float32)
  for i, a in enumerate(people):
    joints[i] = np.reshape(a['keypoints'], (-1, 3))
  return joints


def generate_targets(joints, heatmap_wh, sigma=2, max_people=30):
  """HeatmapGenerator + JointsEncoder (tag_per_joint) as mmpose's loops.

  Returns:
    heatmaps [17, h, w] float32, encodings [M, 17, 2] int32.
  """
  w, h = heatmap_wh
  hms = np.zeros((17, h, w), np.float32)
  xs = np.arange(0, 6 * sigma + 3, 1, np.float32)
  c = 3 * sigma + 1
  g = np.exp(-((xs - c)**2 + (xs[:, None] - c)**2) / (2 * sigma**2))
  enc = np.zeros((max_people, 17, 2), np.int32)
  for p, person in enumerate(joints):
    tot = 0
    for k, pt in enumerate(person):
      xi, yi = int(pt[0]), int(pt[1])
      if pt[2] <= 0 or xi < 0 or yi < 0 or xi >= w or yi >= h:
        continue
      if p < max_people:
        enc[p][tot] = (k * h * w + yi * w + xi, 1)
        tot += 1
      ul = int(np.round(xi - 3 * sigma - 1)), int(np.round(yi - 3 * sigma - 1))
      br = int(np.round(xi + 3 * sigma + 2)), int(np.round(yi + 3 * sigma + 2))
      c0, d0 = max(0, -ul[0]), min(br[0], w) - ul[0]
      a0, b0 = max(0, -ul[1]), min(br[1], h) - ul[1]
      cc, dd = max(0, ul[0]), min(br[0], w)
      aa, bb = max(0, ul[1]), min(br[1], h)
      hms[k, aa:bb, cc:dd] = np.maximum(hms[k, aa:bb, cc:dd],
                                        g[a0:b0, c0:d0])
  return hms, enc


def train_example(image, anns, *, rot, aug_scale, shift, flip, input_wh,
                  heatmap_wh, scale_type='short', sigma=2, max_people=30):
  """One training example as mmpose builds it, from explicit parameters.

  Args:
    image: [H, W, 3] uint8 RGB (read_rgb).
    anns: the image's COCO annotations (all of them, crowd included).
    rot: rotation (degrees).
    aug_scale: zoom of the image box.
    shift: (dx, dy) center shift in image px.
    flip: mirror after the affine.
    input_wh: input size (w, h).
    heatmap_wh: heatmap size (w, h).
    scale_type: 'short' or 'long'.
    sigma: heatmap Gaussian sigma.
    max_people: M.

  Returns:
    dict: uint8 [H, W, 3] (warped image), image [3, H, W] float32
    (normalised), mask [h, w] float32, joints [P, 17, 3] float32 (heatmap
    px), heatmaps [17, h, w] float32, enc [M, 17, 2] int32.
  """
  h, w = image.shape[:2]
  valid = valid_mask(anns, h, w)
  joints = people_joints(anns)
  center = np.array((w / 2, h / 2)) + np.asarray(shift, np.float64)
  img_scale = np.array([w, h], np.float32) * np.float32(aug_scale)
  mat_hm = get_affine_transform(
      center, get_scale(img_scale, heatmap_wh, scale_type) / 200.0, rot,
      heatmap_wh)
  mat_in = get_affine_transform(
      center, get_scale(img_scale, input_wh, scale_type) / 200.0, rot,
      input_wh)
  mask = cv2.warpAffine((valid * 255).astype(np.uint8), mat_hm,
                        tuple(heatmap_wh)) / 255
  mask = (mask > 0.5).astype(np.float32)
  flat = joints[..., :2].reshape(-1, 2).astype(np.float64)
  joints[..., :2] = (np.concatenate([flat, np.ones_like(flat[:, :1])], 1) @
                     mat_hm.T).reshape(joints.shape[:2] + (2,))
  out = cv2.warpAffine(image, mat_in, tuple(input_wh))
  if flip:
    out = out[:, ::-1] - np.zeros_like(out)
    mask = mask[:, ::-1].copy()
    joints = joints[:, FLIP_INDEX]
    joints[:, :, 0] = heatmap_wh[0] - joints[:, :, 0] - 1
  x = out.transpose(2, 0, 1).astype(np.float32) / 255.0
  x = (x - MEAN[:, None, None]) / STD[:, None, None]
  hms, enc = generate_targets(joints, heatmap_wh, sigma, max_people)
  return dict(uint8=out, image=x, mask=mask, joints=joints, heatmaps=hms,
              enc=enc)
