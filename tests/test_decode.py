"""decode imports no jax/flax/tensorflow/torch and decodes a small case.

A subprocess blocks those imports (a meta path finder that raises
ImportError) and decodes hand-made candidates with refine over numpy maps;
the expected people are worked out by hand below.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import BLOCK_IMPORTS
from tests.conftest import REPO_ROOT

_SCRIPT = BLOCK_IMPORTS + textwrap.dedent('''
    import json
    import numpy as np
    from ae_jax.infer import decode
    from ae_jax.infer import refine

    # 3 joints on a 6 x 8 map, tag dim 1, M = 3 candidates per joint.
    K, H, W = 3, 6, 8
    heat = np.zeros((K, H, W), np.float32)
    tags = np.zeros((K, H, W, 1), np.float32)
    nan = -np.inf
    # joint 0: two people (tags 0 and 5); joint 1: person A only;
    # joint 2: nobody above the threshold (refine fills it).
    val = np.array([[0.9, 0.8, nan], [0.7, 0.05, nan], [0.05, nan, nan]],
                   np.float32)
    xy = [[(1, 1), (6, 4), (0, 0)], [(2, 2), (7, 5), (0, 0)],
          [(3, 3), (0, 0), (0, 0)]]
    tag = np.array([[0.0, 5.0, 0], [0.2, 9.0, 0], [0.1, 0, 0]],
                   np.float32)[..., None]
    idx = np.array([[y * W + x for x, y in row] for row in xy], np.int32)
    neighbors = np.zeros((K, 3, 4), np.float32)
    neighbors[0, 0] = [0.1, 0.0, 0.0, 0.3]  # down > up, left > right
    for k in range(K):
      for m in range(3):
        if val[k, m] > 0:
          x, y = xy[k][m]
          heat[k, y, x], tags[k, y, x, 0] = val[k, m], tag[k, m, 0]
    heat[2, 4, 5], tags[2, 4, 5, 0] = 0.4, 4.5  # person B's joint 2
    heat[2, 1, 6], tags[2, 1, 6, 0] = 0.3, 0.0  # person A's joint 2
    cands = decode.Candidates(val, idx, tag, neighbors)
    poses = decode.decode_candidates(
        cands, W, decode.GroupingParams(), refine.host_argmax(heat, tags))
    image = poses.to_image(center=[40, 30], scale=[0.8, 0.6],
                           map_size=(W, H))
    print(json.dumps({
        'coords': poses.coords.tolist(),
        'joint_scores': poses.joint_scores.tolist(),
        'scores': poses.scores.tolist(),
        'image': image.coords.tolist(),
        'modules': sorted(m for m in sys.modules
                          if m.split('.')[0] in BLOCKED)}))
''')


def test_decode_runs_without_jax_tf_torch():
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', _SCRIPT], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['modules'] == []
  # Person A (tag 0) owns joints 0 and 1; person B (tag 5) joint 0 only
  # (joint 1's 0.05 is below 0.1). Scores: mean over K before refine.
  assert out['scores'] == [pytest.approx((0.9 + 0.7) / 3),
                           pytest.approx(0.8 / 3)]
  a, b = out['coords']
  # adjust: +0.5, +-0.25 toward the higher neighbour: A's joint 0 has more
  # heat below (y+1) and to the left (x-1); equal neighbours give -0.25.
  assert a[0] == [1 + 0.5 - 0.25, 1 + 0.5 + 0.25]
  assert b[0] == [6 + 0.5 - 0.25, 4 + 0.5 - 0.25]
  assert a[1] == [2 + 0.5 - 0.25, 2 + 0.5 - 0.25]
  # refine, argmax of heat - round(|tag - mean tag|): A (mean 0.1) finds
  # joint 2 at (6, 1) (0.3 - 0); B (mean 5) at (5, 4) (0.4 - round(0.5),
  # half to even: 0) and joint 1 at the corner (7, 5) (0.05 - 4 beats
  # 0.7 - 5), whose clipped neighbours are itself: +0.25 on both axes.
  assert out['joint_scores'] == [
      [pytest.approx(0.9), pytest.approx(0.7), pytest.approx(0.3)],
      [pytest.approx(0.8), pytest.approx(0.05), pytest.approx(0.4)]]
  assert a[2] == [6 + 0.5 - 0.25, 1 + 0.5 - 0.25]
  assert b[2] == [5 + 0.5 - 0.25, 4 + 0.5 - 0.25]
  assert b[1] == [7 + 0.5 + 0.25, 5 + 0.5 + 0.25]
  # Image px: x * (0.8 * 200 / 8) + 40 - 80; y * (0.6 * 200 / 6) + 30 - 60.
  assert out['image'][0][0] == pytest.approx([a[0][0] * 20 - 40,
                                              a[0][1] * 20 - 30])
