"""People -> COCO keypoint results json -> pycocotools AP table.

Results follow mmpose's BottomUpCocoDataset.evaluate (use_nms False): one
entry per person with image_id, category_id 1, keypoints flat
[x1, y1, v1, ..., xK, yK, vK] where v is the joint's heatmap value (not a
visibility flag), score = the person score (mean joint value before
refine) and bbox from the keypoint extent. COCOeval('keypoints') with the
dataset's OKS sigmas (COCO's by default) scores them (xtcocotools in mmpose
gives the same numbers for COCO).

`evaluate` is the evaluation loop: the split's images (each process every
n-th) through a predictor's stream, the results gathered, scored, written.
No jax import at module level (jax only gathers multi-process results), so
an exported model's predictor can use it too.

Shapes: keypoints [P, K, 3] float32 (x, y image px, value), scores [P].
"""

import contextlib
import io
import json
import os
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from ae_jax import outputs
from ae_jax.data import eval_input
from ae_jax.infer import decode

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APm', 'APl', 'AR', 'AR50', 'AR75',
                'ARm', 'ARl')  # order of COCOeval.stats for keypoints
PERSON_CATEGORY_ID = 1


def poses_to_results(image_id: int, poses: decode.Poses) -> List[dict]:
  """COCO result dicts of one image's people (mmpose's json format)."""
  out = []
  for pose, score in zip(poses.keypoints, poses.scores):
    left_top = pose.min(axis=0)
    right_bottom = pose.max(axis=0)
    out.append({
        'image_id': int(image_id),
        'category_id': PERSON_CATEGORY_ID,
        'keypoints': pose[:, :3].reshape(-1).tolist(),
        'score': float(score),
        'bbox': [float(left_top[0]), float(left_top[1]),
                 float(right_bottom[0] - left_top[0]),
                 float(right_bottom[1] - left_top[1])],
    })
  return out


class EvalError(ValueError):
  """A user error found before or instead of scoring (one line)."""


def check_output_path(path: str) -> None:
  """Fails fast (before any evaluation) when `path` cannot take the json.

  Creates a missing parent folder. Raises:
    EvalError: `path` is a directory, or its folder is not writable.
  """
  if os.path.isdir(path):
    raise EvalError(f'output {path} is a directory; give a file name')
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=parent, prefix='.ae_jax_probe'):
      pass
  except OSError as e:
    raise EvalError(f'cannot write output {path}: {e.strerror or e}') from None


def write_results(results: List[dict], path: str) -> None:
  """Writes the json atomically: a temporary file beside it, then rename."""
  parent = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=parent, prefix='.' + os.path.basename(path),
                             suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(results, f)
    outputs.apply_umask(tmp)  # mkstemp's file is 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def score_results(coco_gt: coco_api.COCO, results: List[dict],
                  image_ids: Optional[Iterable[int]] = None,
                  verbose: bool = True,
                  sigmas: Optional[Sequence[float]] = None
                  ) -> Dict[str, float]:
  """COCOeval('keypoints') of result dicts against the ground truth.

  Args:
    coco_gt: ground truth COCO object.
    results: dicts as from `poses_to_results`.
    image_ids: images to score; default all ground-truth images (images
      without results count as misses, as in mmpose).
    verbose: print pycocotools' summary.
    sigmas: [K] OKS sigmas (KeypointSpec.sigmas); default COCO's 17.

  Returns:
    {name: value} for METRIC_NAMES; all 0 when there are no results (as
    mmpose).
  """
  if not results:
    return {name: 0.0 for name in METRIC_NAMES}
  coco_dt = coco_gt.loadRes(results)
  evaluator = cocoeval.COCOeval(coco_gt, coco_dt, 'keypoints')
  if sigmas is not None:
    evaluator.params.kpt_oks_sigmas = np.asarray(sigmas, np.float64)
  if image_ids is not None:
    evaluator.params.imgIds = sorted(image_ids)
  evaluator.evaluate()
  evaluator.accumulate()
  if verbose:
    evaluator.summarize()
  else:
    with contextlib.redirect_stdout(io.StringIO()):
      evaluator.summarize()
  return {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}


def format_table(metrics: Dict[str, float],
                 names: Tuple[str, ...] = ('AP', 'AP50', 'AP75', 'APm', 'APl',
                                           'AR', 'AR50')) -> str:
  """A two-row markdown table of the main metrics."""
  head = '| ' + ' | '.join(names) + ' |'
  rule = '|' + '|'.join('---' for _ in names) + '|'
  row = '| ' + ' | '.join(f'{metrics[n]:.3f}' for n in names) + ' |'
  return '\n'.join([head, rule, row])


def format_report(metrics: Dict[str, float], info: dict, split: str,
                  settings: str = '') -> str:
  """What eval.py prints: a summary line, skipped images, the AP table.

  Args:
    metrics, info: as returned by `evaluate`.
    split: the evaluated split, e.g. 'val2017'.
    settings: appended to the summary line (e.g. the test scales and flip).
  """
  lines = [f'COCO {split} keypoints, {info["num_images"]} images, '
           f'{info["num_people"]} people, '
           f'{info["images_per_second"]:.2f} img/s' +
           (f', {settings}' if settings else '')]
  if 'bytes_to_host' in info:
    lines.append(f'device->host {info["bytes_to_host"] / 1e6:.2f} MB/image '
                 f'(full maps: {info["full_map_bytes"] / 1e6:.2f} MB)')
  if info['skipped']:
    lines.append(f'skipped {len(info["skipped"])} unreadable image(s): ' +
                 ', '.join(name for name, _ in info['skipped']))
  lines.append(format_table(metrics))
  return '\n'.join(lines)


def _gather(value, process_count: int):
  """All processes' json-able `value`s, as a list (process order)."""
  if process_count == 1:
    return [value]
  # Multi-process runs only: single-process eval runs without jax.
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size]))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  every = multihost_utils.process_allgather(padded)
  return [json.loads(every[i, :int(n)].tobytes().decode())
          for i, n in enumerate(np.asarray(sizes).reshape(-1))]


def evaluate(stream: decode.StreamFn, coco_root: str, split: str = 'val2017', *,
             output_path: Optional[str] = None,
             max_images: Optional[int] = None,
             log_every: int = 50, process_index: int = 0,
             process_count: int = 1,
             sigmas: Optional[Sequence[float]] = None,
             annotations: str = '', images: str = ''
             ) -> Tuple[Dict[str, float], dict]:
  """Runs `stream` over every image of a split and scores the results.

  Multi-process: process i takes images i, i + n, ... (n = process_count)
  with its own local devices; results are gathered and scored on every
  process (identical), and process 0 writes the json.

  Args:
    stream: the predictor (decode.StreamFn), e.g. predict.Predictor(...).stream.
    coco_root: COCO root with annotations/ and <split>/.
    split: e.g. 'val2017'.
    output_path: where to write the results json (optional); checked (and
      its folder created) before any image is evaluated, written
      atomically.
    max_images: evaluate the first N images only (then AP covers those).
    log_every: progress line every N images.
    process_index, process_count: this process's share (jax.process_*).
    sigmas: [K] OKS sigmas (KeypointSpec.sigmas; the annotations' K is
      checked against it); default COCO's 17.
    annotations, images: other files than the split's standard ones
      (data/coco.split_paths).

  Returns:
    (metrics, info) with info = {'num_images', 'skipped': [(file, reason)],
    'images_per_second', 'num_people'} and, when the predictions report
    them, 'bytes_to_host' / 'full_map_bytes' per image (this process's).

  Raises:
    EvalError: an unusable output_path, or a split with no images.
  """
  if output_path and process_index == 0:
    check_output_path(output_path)
  images = eval_input.EvalImages(
      coco_root, split, max_images=max_images, annotations=annotations,
      images=images, num_joints=None if sigmas is None else len(sigmas),
      shard=(process_index, process_count))
  if not images.all_image_ids:
    raise EvalError(f'split {split} of {coco_root} has no images to '
                     'evaluate' + (f' (max_images {max_images})'
                                   if max_images is not None else ''))
  total = len(images)
  per_image = {}
  start = time.perf_counter()
  done = moved = full_maps = 0
  items = ((ex.image_id, ex.image) for ex in images)
  for pred in stream(items):
    per_image[pred.key] = poses_to_results(pred.key, pred.poses)
    moved += pred.bytes_to_host
    full_maps += pred.full_map_bytes
    done += 1
    if done % log_every == 0 or done == total - len(images.skipped):
      elapsed = time.perf_counter() - start
      rate = done / max(elapsed, 1e-9)
      logging.info('eval %d/%d images, %.2f img/s, ETA %.0f s', done, total,
                   rate, (total - done) / rate)
  elapsed = time.perf_counter() - start
  results = [r for i in sorted(per_image) for r in per_image[i]]
  shares = _gather([results, images.skipped, done], process_count)
  results = [r for share in shares for r in share[0]]
  results.sort(key=lambda r: r['image_id'])  # stable: per-image order kept
  skipped = sorted(tuple(s) for share in shares for s in share[1])
  done = sum(share[2] for share in shares)
  if skipped:
    logging.warning('%d image(s) could not be read and were skipped: %s',
                    len(skipped), ', '.join(name for name, _ in skipped))
  if output_path and process_index == 0:
    write_results(results, output_path)
    logging.info('wrote %d results to %s', len(results), output_path)
  scored_ids = images.all_image_ids if max_images is not None else None
  metrics = score_results(images.coco, results, scored_ids, sigmas=sigmas,
                          verbose=process_index == 0)
  info = {'num_images': done, 'skipped': skipped,
          'images_per_second': done / max(elapsed, 1e-9),
          'num_people': len(results)}
  local = len(per_image)
  if full_maps and local:
    info['bytes_to_host'] = moved / local
    info['full_map_bytes'] = full_maps / local
  return metrics, info
