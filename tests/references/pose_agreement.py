"""How many joints two predictions of the same image share (tests, bench).

People are paired one to one (the pairing with the most agreeing joints,
Hungarian), so the order they were created in does not matter; a joint
agrees when x and y are within `px` and its score within `score`; a person
without a partner counts all its joints as different.
"""

import numpy as np
import scipy.optimize


def agreement(a, b, px: float = 1.0, score: float = 0.01) -> tuple[int, int]:
  """(agreeing joints, joints) of two decode.Poses of one image."""
  dist = np.abs(a.coords[:, None] - b.coords[None]).max(-1)  # [Pa, Pb, K]
  diff = np.abs(a.joint_scores[:, None] - b.joint_scores[None])
  same = ((dist <= px) & (diff <= score)).sum(-1)
  rows, cols = scipy.optimize.linear_sum_assignment(-same)
  return int(same[rows, cols].sum()), max(len(a), len(b)) * a.coords.shape[1]
