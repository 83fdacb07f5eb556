"""mmpose-style grouping (HeatmapParser.parse) written plainly, as a reference.

Written from SPEC.md's "Inference and grouping" text in the plainest way:
shifted-window NMS, a full stable sort per joint, a dict of people keyed by
their first tag value, the `munkres` package (as mmpose does) or scipy on
the same cost matrix, per-pixel-loop adjust, and a refine that scans all K
full maps once per person (heatmap - round(tag distance to the person's
mean tag), first argmax, quarter offsets, only missing joints filled).
ae_jax.infer (decode, matching, refine) shares no code with it.

Legend: K joints, H x W map size, L tag dim, P people.
"""

import numpy as np

_JOINT_ORDER = [0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16]


def _solve(cost, solver):
  if solver == 'munkres':
    import munkres  # pylint: disable=g-import-not-at-top
    return [tuple(p) for p in munkres.Munkres().compute(cost.tolist())]
  import scipy.optimize  # pylint: disable=g-import-not-at-top
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return list(zip(rows.tolist(), cols.tolist()))


def reference_parse(heatmaps, tags, *, nms_kernel=5, max_people=30,
                    detection_threshold=0.1, tag_threshold=1.0,
                    use_detection_val=True, adjust=True, refine=True,
                    solver='munkres'):
  """Straightforward parser: heatmaps [K,H,W], tags [K,H,W,L] -> poses, scores.

  Returns poses [P, K, 3 + L] float32 (grid coords) and scores [P] float32.
  """
  heatmaps = np.asarray(heatmaps, np.float32)
  tags = np.asarray(tags, np.float32)
  num_joints, height, width = heatmaps.shape
  tag_dim = tags.shape[-1]
  pad = nms_kernel // 2
  # NMS: max over shifted copies of a -inf padded map.
  padded = np.full((num_joints, height + 2 * pad, width + 2 * pad), -np.inf,
                   np.float32)
  padded[:, pad:pad + height, pad:pad + width] = heatmaps
  pooled = np.full_like(heatmaps, -np.inf)
  for dy in range(nms_kernel):
    for dx in range(nms_kernel):
      pooled = np.maximum(pooled, padded[:, dy:dy + height, dx:dx + width])
  nms = heatmaps * (pooled == heatmaps)

  # Top-k per joint by a full stable sort (ties: lower flat index first).
  cands = []
  for k in range(num_joints):
    flat = nms[k].ravel()
    top = np.argsort(-flat, kind='stable')[:max_people]
    joints = []
    for i in top:
      v = flat[i]
      if v > detection_threshold:
        y, x = divmod(int(i), width)
        joints.append((x, y, v, tags[k, y, x].copy()))
    cands.append(joints)

  # Matching, people keyed by the tag[0] of the candidate that created them.
  people = {}  # key -> [K, 3 + L] float32
  tag_lists = {}  # key -> list of [L] tags
  for k in _JOINT_ORDER if num_joints == 17 else range(num_joints):
    joints = cands[k]
    if not joints:
      continue
    if not people:
      for x, y, v, t in joints:
        key = float(t[0])
        people.setdefault(key, np.zeros((num_joints, 3 + tag_dim),
                                        np.float32))
        people[key][k] = [x, y, v] + list(t)
        tag_lists[key] = [t]
      continue
    keys = list(people.keys())
    means = [np.mean(tag_lists[key], axis=0) for key in keys]
    n, m = len(joints), len(keys)
    dist = np.zeros((n, m))
    cost = np.zeros((n, max(n, m)))
    cost[:, m:] = 1e10
    for i, (x, y, v, t) in enumerate(joints):
      for j in range(m):
        d = np.asarray(t, np.float64) - np.asarray(means[j], np.float64)
        dist[i, j] = np.sqrt(np.sum(d * d))
        cost[i, j] = (round(dist[i, j]) * 100 - float(v)
                      if use_detection_val else dist[i, j])
    for i, j in _solve(cost, solver):
      x, y, v, t = joints[i]
      if j < m and dist[i, j] < tag_threshold:
        key = keys[j]
        tag_lists[key].append(t)
      else:
        key = float(t[0])
        people.setdefault(key, np.zeros((num_joints, 3 + tag_dim),
                                        np.float32))
        tag_lists[key] = [t]
      people[key][k] = [x, y, v] + list(t)
  poses = [people[key] for key in people]

  if adjust:
    for pose in poses:
      for k in range(num_joints):
        if pose[k, 2] > 0:
          x, y = float(pose[k, 0]), float(pose[k, 1])
          xi, yi = int(x), int(y)
          h = heatmaps[k]
          y += 0.25 if h[min(height - 1, yi + 1), xi] > h[max(0, yi - 1),
                                                          xi] else -0.25
          x += 0.25 if h[yi, min(width - 1, xi + 1)] > h[yi, max(0, xi -
                                                               1)] else -0.25
          pose[k, 0], pose[k, 1] = x + 0.5, y + 0.5
  scores = [pose[:, 2].mean() for pose in poses]

  if refine:
    for pose in poses:
      own = []
      for k in range(num_joints):
        if pose[k, 2] > 0:
          x = min(max(int(pose[k, 0]), 0), width - 1)
          y = min(max(int(pose[k, 1]), 0), height - 1)
          own.append(tags[k, y, x])
      mean_tag = np.mean(own, axis=0)
      found = []
      for k in range(num_joints):  # every map, as the reference does
        dist = np.sqrt(((tags[k] - mean_tag[None, None]) ** 2).sum(axis=2))
        score = heatmaps[k] - np.round(dist)
        y, x = np.unravel_index(np.argmax(score), score.shape)
        h = heatmaps[k]
        fx = x + 0.5 + (0.25 if h[y, min(width - 1, x + 1)] >
                        h[y, max(0, x - 1)] else -0.25)
        fy = y + 0.5 + (0.25 if h[min(height - 1, y + 1), x] >
                        h[max(0, y - 1), x] else -0.25)
        found.append((fx, fy, h[y, x]))
      for k in range(num_joints):
        if found[k][2] > 0 and pose[k, 2] == 0:
          pose[k, :3] = found[k]
  poses = (np.stack(poses).astype(np.float32) if poses else
           np.zeros((0, num_joints, 3 + tag_dim), np.float32))
  return poses, np.asarray(scores, np.float32)
