"""Draws detected people (skeleton lines and joint dots) with cv2.

`draw_poses` draws on one image; `annotate_images` / `annotate_video` run
a predictor's stream over image files / a video and write the drawings as
PNGs / an mp4 plus the poses as json (demo.py). `output_bases` picks output
names that never collide with each other or with an input.

Shapes: image [H, W, 3] uint8 RGB; poses: decode.Poses in image pixels
(keypoints [P, K, 3] float32 x, y, joint score; scores [P]).
"""

import itertools
import json
import os
import time
from typing import Dict, List, Sequence, Tuple

from absl import logging
import cv2
import numpy as np

from ae_jax import keypoints
from ae_jax.data import coco
from ae_jax.infer import decode

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif',
              '.tiff', '.jp2', '.ppm', '.pgm')
VIDEO_EXTS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg',
              '.mpeg', '.wmv')

# One colour per person (RGB), cycled.
_PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
    [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
                    np.uint8)


def draw_poses(image: np.ndarray, poses: decode.Poses,
               joint_threshold: float = 0.1,
               person_threshold: float = 0.0,
               skeleton=keypoints.COCO.skeleton) -> np.ndarray:
  """Returns a copy of `image` with each person's skeleton drawn.

  Args:
    image: [H, W, 3] uint8 RGB.
    poses: people in image pixels; those scoring at or below
      person_threshold are skipped.
    joint_threshold: joints (and limbs touching them) with a score at or
      below this are not drawn.
    person_threshold: see poses.
    skeleton: limbs as 0-based joint pairs (KeypointSpec.skeleton).
  """
  canvas = np.ascontiguousarray(image, np.uint8).copy()
  thickness = max(1, round(max(image.shape[:2]) / 300))
  for p, (pose, score) in enumerate(zip(poses.keypoints, poses.scores)):
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


def expand_inputs(paths: Sequence[str]):
  """Image files, video files and bad paths of files and folders.

  A folder contributes its image and video files (by extension, sorted,
  not recursive). A file with a video extension is a video, any other file
  an image. Returns (images, videos, failed) where failed are (path,
  reason) of missing paths and folders without images or videos.
  """
  images, videos, failed = [], [], []
  for path in paths:
    if os.path.isdir(path):
      names = sorted(n for n in os.listdir(path)
                     if n.lower().endswith(IMAGE_EXTS + VIDEO_EXTS))
      if not names:
        failed.append((path, 'folder has no image or video files'))
      for n in names:
        full = os.path.join(path, n)
        (videos if n.lower().endswith(VIDEO_EXTS) else images).append(full)
    elif not os.path.exists(path):
      failed.append((path, 'no such file or folder'))
    elif path.lower().endswith(VIDEO_EXTS):
      videos.append(path)
    else:
      images.append(path)
  return images, videos, failed


def output_bases(inputs: Sequence[str], out_dir: str,
                 suffixes: Sequence[str],
                 reserved: Sequence[str] = (),
                 overwrite: bool = False) -> Dict[str, str]:
  """{input: out_dir/base} with base + every suffix a fresh file name.

  The base is the file stem; when that collides with another output (img.gif
  and img.png), with an input (--out = the input folder), with a reserved
  name or (unless `overwrite`) with an existing file, the extension joins it
  (img_gif), then a counter (img_gif_2). No output is ever an input file.
  """
  taken = {os.path.realpath(p) for p in inputs}
  taken |= {os.path.realpath(os.path.join(out_dir, n)) for n in reserved}
  bases = {}
  for path in inputs:
    stem, ext = os.path.splitext(os.path.basename(path))
    options = [stem, f'{stem}_{ext[1:]}' if ext else stem + '_out']
    for base in itertools.chain(options, (f'{options[1]}_{i}'
                                          for i in itertools.count(2))):
      full = os.path.join(out_dir, base)
      names = [os.path.realpath(full + s) for s in suffixes]
      if not taken.intersection(names) and (overwrite or not any(
          os.path.lexists(n) for n in names)):
        taken.update(names)
        bases[path] = full
        break
  return bases


def people_json(poses: decode.Poses) -> List[dict]:
  """[{'score', 'keypoints': [[x, y, value] x K]}] of one image."""
  return [{'score': float(s), 'keypoints': np.round(
      np.asarray(p, np.float64), 3).tolist()}
          for p, s in zip(poses.keypoints, poses.scores)]


def write_json(value, path: str) -> None:
  """json.dump to a temporary file beside `path`, then rename."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f)
  os.replace(tmp, path)


def annotate_images(
    stream: decode.StreamFn, paths: Sequence[str], out_dir: str,
    person_threshold: float = 0.2, bases: Dict[str, str] | None = None,
    skeleton=keypoints.COCO.skeleton) -> Tuple[List[dict], List[str]]:
  """Draws each image's people into {base}.png (see output_bases).

  Args:
    stream: the predictor, e.g. predict.Predictor(...).stream.
    paths: image files.
    out_dir: created if missing.
    person_threshold: people scoring at or below this are not drawn.
    bases: output bases per path (default output_bases(paths, out_dir)).
    skeleton: limbs as 0-based joint pairs (KeypointSpec.skeleton).

  Returns:
    (entries, failed): one {'source', 'output', 'people'} per image drawn,
    in input order, and the paths that could not be read (each logged).
  """
  os.makedirs(out_dir, exist_ok=True)
  bases = bases or output_bases(paths, out_dir, ('.png',))
  failed, entries = [], {}

  def readable():
    for i, path in enumerate(paths):
      try:
        yield i, coco.decode_image(path)
      except coco.ImageError as e:
        logging.error('%s', e)
        failed.append(path)

  # The decoded image is needed again to draw on: keep it by index.
  images = {}

  def keep(items):
    for i, image in items:
      images[i] = image
      yield i, image

  for pred in stream(keep(readable())):
    i, poses = pred.key, pred.poses
    image, path = images.pop(i), paths[i]
    canvas = draw_poses(image, poses, person_threshold=person_threshold,
                        skeleton=skeleton)
    out = bases[path] + '.png'
    cv2.imwrite(out, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    entries[i] = {'source': path, 'output': out,
                  'people': people_json(poses)}
    logging.info('%s: %d people scoring > %g (%d in the json) -> %s', path,
                 int((poses.scores > person_threshold).sum()), person_threshold,
                 len(poses.scores), out)
  return [entries[i] for i in sorted(entries)], failed


def annotate_video(
    stream: decode.StreamFn, path: str, base: str,
    person_threshold: float = 0.2, log_every: int = 25, skeleton=keypoints.COCO.skeleton) -> int | None:
  """Draws every frame of a video into {base}.mp4 (mp4v), poses {base}.json.

  The json is {'source', 'fps', 'frames': [{'frame', 'people'}]}.

  Returns:
    The number of frames, or None when the video cannot be read (logged).
  """
  capture = cv2.VideoCapture(path)
  ok, first = capture.read() if capture.isOpened() else (False, None)
  if not ok:
    logging.error('cannot read video %s', path)
    capture.release()
    return None
  fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
  height, width = first.shape[:2]
  writer = cv2.VideoWriter(base + '.mp4', cv2.VideoWriter_fourcc(*'mp4v'),
                           fps, (width, height))
  frames, pending = [], {}
  start = time.perf_counter()

  def read():
    index, frame = 0, first
    while frame is not None:
      pending[index] = frame
      yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
      index += 1
      ok, frame = capture.read()
      frame = frame if ok else None

  results, next_out = {}, 0
  try:
    for pred in stream(read()):
      results[pred.key] = pred.poses
      while next_out in results:  # write in frame order
        poses = results.pop(next_out)
        frame = pending.pop(next_out)
        canvas = draw_poses(frame[..., ::-1], poses,
                            person_threshold=person_threshold,
                            skeleton=skeleton)
        writer.write(np.ascontiguousarray(canvas[..., ::-1]))
        frames.append({'frame': next_out, 'people': people_json(poses)})
        next_out += 1
        if next_out % log_every == 0:
          logging.info('%s: %d frames, %.2f img/s', path, next_out,
                       next_out / (time.perf_counter() - start))
  finally:
    writer.release()
    capture.release()
  write_json({'source': path, 'fps': fps, 'frames': frames}, base + '.json')
  logging.info('%s: %d frames -> %s.mp4, %s.json', path, len(frames), base,
               base)
  return len(frames)
