"""Joint-by-joint tag matching (mmpose 0.x HeatmapParser._match_by_tag).

numpy/scipy only (decode.py's half of grouping). Float32/float64
arithmetic follows mmpose operation by operation, so the rounded tag
distances, and hence the people, come out identical; ties in the rounded
cost go as scipy's linear_sum_assignment breaks them on mmpose's matrix.

Legend: K joints, N candidates of one joint, L tag dim, P people.
"""

from typing import List, NamedTuple

import numpy as np
import scipy.optimize

# mmpose's joint_order for COCO: head, shoulders, hips, then limbs. As in
# mmpose, it is used whenever K == 17; other K match in index order.
JOINT_ORDER = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)


class JointCandidates(NamedTuple):
  """Peaks of one joint above the threshold, in top-k order.

  loc [N, 2] int64 (x, y); val [N] float32 descending; tag [N, L] float32.
  """
  loc: np.ndarray
  val: np.ndarray
  tag: np.ndarray


class _People:
  """Growing person table with mmpose's dict-by-first-tag semantics.

  mmpose keys each person by tag[0] of the candidate that created it; a new
  person whose key already exists overwrites that person's joint and resets
  its tag list (this happens with plateaus, e.g. duplicated border pixels of
  upsampled maps). We keep that behaviour so the output is the same.
  """

  def __init__(self, num_joints: int, tag_dim: int):
    self.joints = np.zeros((8, num_joints, 3 + tag_dim), np.float32)
    # Tag history per person in append order; mean = np.mean of it, so the
    # float32 reduction is the same as mmpose's np.mean over a list.
    self.history = np.zeros((8, num_joints, tag_dim), np.float32)
    self.count = np.zeros(8, np.int64)
    self.keys = {}
    self.num = 0
    self._means = np.zeros((8, tag_dim), np.float32)
    self._dirty = set()

  def _grow(self):
    cap = self.joints.shape[0] * 2
    for name in ('joints', 'history', 'count', '_means'):
      old = getattr(self, name)
      new = np.zeros((cap,) + old.shape[1:], old.dtype)
      new[:old.shape[0]] = old
      setattr(self, name, new)

  def join(self, person: int, joint: int, row: np.ndarray, tag: np.ndarray):
    self.joints[person, joint] = row
    self.history[person, self.count[person]] = tag
    self.count[person] += 1
    self._dirty.add(person)

  def create(self, joint: int, row: np.ndarray, tag: np.ndarray):
    key = float(tag[0])
    person = self.keys.get(key)
    if person is None:
      if self.num == self.joints.shape[0]:
        self._grow()
      person = self.num
      self.keys[key] = person
      self.num += 1
    self.joints[person, joint] = row
    self.history[person, 0] = tag
    self.count[person] = 1
    self._dirty.add(person)

  def mean_tags(self, num: int) -> np.ndarray:
    """[num, L] float32 mean tag of the first `num` people."""
    for p in self._dirty:
      self._means[p] = np.mean(self.history[p, :self.count[p]], axis=0)
    self._dirty.clear()
    return self._means[:num]


def match_candidates(candidates: List[JointCandidates], *,
                     tag_threshold: float = 1.0,
                     use_detection_val: bool = True,
                     ignore_too_much: bool = False,
                     max_people: int = 30) -> np.ndarray:
  """Groups candidates into people joint by joint (mmpose _match_by_tag).

  For each joint in JOINT_ORDER the cost of candidate i (rows, top-k order)
  to person j (columns, creation order) is round(|tag_i - mean_tag_j|) * 100
  - val_i, padded with 1e10 columns to square when there are more candidates
  than people, solved with scipy's linear_sum_assignment. A pair counts only
  if the un-rounded distance < tag_threshold; every other candidate starts a
  new person.

  Returns:
    rows [P, K, 3 + L] float32 in creation order: x, y (integer grid),
    value (0 = missing), tags.
  """
  num_joints = len(candidates)
  tag_dim = candidates[0].tag.shape[1]
  order = JOINT_ORDER if num_joints == 17 else tuple(range(num_joints))
  people = _People(num_joints, tag_dim)
  for idx in order:
    cand = candidates[idx]
    n = cand.val.shape[0]
    if n == 0:
      continue
    # mmpose concatenates int64 locations with float32 values: float64 rows.
    rows = np.concatenate(
        [cand.loc, cand.val[:, None], cand.tag], 1).astype(np.float64)
    if people.num == 0:
      for r in range(n):
        people.create(idx, rows[r], cand.tag[r])
      continue
    num_cols = people.num
    if ignore_too_much:
      num_cols = min(num_cols, max_people)
    means = people.mean_tags(num_cols)
    # float64 difference of float32 values, as mmpose's float64 rows.
    diff = rows[:, None, 3:] - means[None].astype(np.float64)
    dist = np.sqrt(np.sum(diff * diff, axis=2))
    cost = dist
    if use_detection_val:
      cost = np.round(dist) * 100 - rows[:, 2:3]
    if n > num_cols:
      cost = np.concatenate(
          [cost, np.full((n, n - num_cols), 1e10, np.float64)], 1)
    row_ind, col_ind = scipy.optimize.linear_sum_assignment(cost)
    for r, c in zip(row_ind.tolist(), col_ind.tolist()):
      if c < num_cols and dist[r, c] < tag_threshold:
        people.join(c, idx, rows[r], cand.tag[r])
      else:
        people.create(idx, rows[r], cand.tag[r])
  num = people.num
  if ignore_too_much:
    num = min(num, max_people)
  return people.joints[:num].copy()
