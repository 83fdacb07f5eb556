"""Test-time inference: resize-align, jitted forward, flip and multi-scale.

Follows mmpose 0.x bottom-up testing (BottomUpGetImgSize,
BottomUpResizeAlign, AssociativeEmbedding.forward_test):
1. The image is warped so its short side is input_size x scale and the long
   side is a multiple of 64 (`get_multi_scale_size`, with the min-scale
   alignment rule); center/scale of the scale-1 size map results back.
2. Per scale (descending), the image and its mirror run as one batch of 2;
   the mirror's maps are flipped back with the left/right joint swap.
3. project2image: every map is resized (bilinear, half-pixel centres =
   torch align_corners=False) to the scale-1 input size. Heatmaps of image
   and mirror are averaged; their tags are kept side by side (L=2).
4. Heatmaps are averaged over scales; tags come from scale 1 only.
5. Grouping, then back to image coordinates: NMS / top-k and the adjust
   neighbours on the device, matching on the host (candidates.py), refine's
   scan on the device (refine_scan.py; XLA:CPU reads the host maps).

Device work (normalise, forward, flip, resize, averaging, layout, NMS,
top-k) is one jit per set of input shapes; shapes are multiples of 64, so
an eval compiles once per distinct aspect bucket, not per image.
`Predictor.predict_stream` batches images of one bucket over the local
devices and overlaps host grouping with the device work.

Legend: H x W resized input (multiples of 64), h x w = H/4 x W/4 model
output, Hb x Wb the scale-1 input size, K=17 joints, L tag dim, P people.
Images [H, W, 3] uint8 RGB 0-255; maps to the host joint-major:
heatmaps [K, Hb, Wb], tags [K, Hb, Wb, L] float32.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import math
import threading
from typing import Any, Hashable, Iterable, Iterator, Sequence, Tuple

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ae_jax.infer import candidates as candidates_lib
from ae_jax.infer import decode
from ae_jax.infer import refine
from ae_jax.infer import refine_scan
from ae_jax.train import checkpoints
from ae_jax import keypoints
from ae_jax import sharding
from ae_jax.data import affine
from ae_jax.models import ae_model

BASE_LENGTH = 64  # Input sides are multiples of this (stride 32, x2 margin).


def _ceil_to_multiple(x: float, base: int) -> int:
  return int(math.ceil(x / base)) * base


def get_multi_scale_size(height: int, width: int, input_size: int,
                         current_scale: float, min_scale: float,
                         base_length: int = BASE_LENGTH):
  """Input size, center and scale for one test scale (mmpose's rule).

  The short side becomes ceil64(input_size x min_scale) x current_scale /
  min_scale; the long side keeps the aspect ratio, rounded up to a multiple
  of base_length at min_scale, then scaled the same way.

  Returns:
    (w_resized, h_resized), center [2] (x, y) px, scale [2] (w, h) in 200 px
    units of the image region that maps onto the resized input.
  """
  min_input = _ceil_to_multiple(min_scale * input_size, base_length)
  ratio = current_scale / min_scale
  if width < height:
    w_resized = int(min_input * ratio)
    h_resized = int(
        _ceil_to_multiple(min_input / width * height, base_length) * ratio)
    scale_w = width / 200.0
    scale_h = h_resized / w_resized * width / 200.0
  else:
    h_resized = int(min_input * ratio)
    w_resized = int(
        _ceil_to_multiple(min_input / height * width, base_length) * ratio)
    scale_h = height / 200.0
    scale_w = w_resized / h_resized * height / 200.0
  # Python's round (half to even), as mmpose.
  center = np.array([round(width / 2.0), round(height / 2.0)], np.float64)
  return (w_resized, h_resized), center, np.array([scale_w, scale_h])


def resize_align(image: np.ndarray, input_size: int, current_scale: float,
                 min_scale: float) -> np.ndarray:
  """Warps [H, W, 3] uint8 to its test size for one scale (cv2 bilinear)."""
  size, center, scale = get_multi_scale_size(
      image.shape[0], image.shape[1], input_size, current_scale, min_scale)
  matrix = affine.get_affine_transform(center, scale, 0, size)
  return cv2.warpAffine(image, matrix, size)


def resize_bilinear(maps: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[h, w, C] -> [height, width, C] like torch bilinear, align_corners=False.

  For upsampling (always the case here) jax's triangle kernel with edge
  renormalisation equals torch's half-pixel sampling with clamped edges.
  """
  if maps.shape[:2] == (height, width):
    return maps
  return jax.image.resize(maps, (height, width) + maps.shape[2:], 'linear')


def _scale_maps(model: nn.Module, variables, image: jnp.ndarray, flip: bool,
                out_hw: Tuple[int, int] | None,
                flip_index: Tuple[int, ...] = keypoints.COCO.flip_index):
  """One scale: heatmaps [h', w', K] and tags [h', w', K, L] (on device)."""
  num_joints = model.num_joints
  x = ae_model.normalize_images(image)
  batch = jnp.stack([x, x[:, ::-1]]) if flip else x[None]
  out = model.apply(variables, batch, train=False)
  heat, tag = out[0, ..., :num_joints], out[0, ..., num_joints:]
  hw = out_hw or heat.shape[:2]
  heat, tag = resize_bilinear(heat, *hw), resize_bilinear(tag, *hw)
  tags = [tag]
  if flip:
    flip_index = jnp.asarray(flip_index, jnp.int32)
    heat_f = out[1, :, ::-1, :num_joints][..., flip_index]
    tag_f = out[1, :, ::-1, num_joints:][..., flip_index]
    heat_f = resize_bilinear(heat_f, *hw)
    tags.append(resize_bilinear(tag_f, *hw))
    heat = (heat + heat_f) / 2.0
  return heat, jnp.stack(tags, axis=-1)


def _compute_maps(variables, images: Tuple[jnp.ndarray, ...], *,
                  model: nn.Module, scales: Tuple[float, ...], flip: bool,
                  base_hw: Tuple[int, int], project2image: bool = True,
                  flip_index: Tuple[int, ...] = keypoints.COCO.flip_index):
  """Aggregated maps of one image over scales (and its mirror).

  Args:
    variables: model variables.
    images: one [H_s, W_s, 3] uint8 image per scale, scales descending.
    model: the AEModel (static).
    scales: descending test scales; must contain 1 when there are several.
    flip: flip test.
    base_hw: (Hb, Wb) scale-1 input size (project2image target).
    project2image: resize maps to the input size (else the largest scale's
      output size, as mmpose).
    flip_index: [K] mirrored joint of each joint (flip test).

  Returns:
    heatmaps [K, H', W'] and tags [K, H', W', L] float32 (joint-major for
    the host grouping).
  """
  heat_sum, tags = None, None
  out_hw = base_hw if project2image else None
  for s, image in zip(scales, images):
    heat, tag = _scale_maps(model, variables, image, flip, out_hw,
                            flip_index)
    if out_hw is None:
      out_hw = heat.shape[:2]  # mmpose: sizes of the first (largest) scale
    heat_sum = heat if heat_sum is None else heat_sum + heat
    if s == 1 or len(scales) == 1:
      tags = tag
  heat = heat_sum / len(scales)
  tags = jax.image.resize(tags, heat.shape[:2] + tags.shape[2:], 'linear') \
      if tags.shape[:2] != heat.shape[:2] else tags
  return jnp.transpose(heat, (2, 0, 1)), jnp.transpose(tags, (2, 0, 1, 3))


_MAP_STATICS = ('model', 'scales', 'flip', 'base_hw', 'project2image',
                'flip_index')
compute_maps = jax.jit(_compute_maps, static_argnames=_MAP_STATICS)


@functools.partial(jax.jit, static_argnames=_MAP_STATICS + (
    'max_people', 'nms_kernel'))
def compute_batch(variables, images: Tuple[jnp.ndarray, ...], *,
                  max_people: int, nms_kernel: int, **statics):
  """`compute_maps` + candidates.top_candidates over a batch of images.

  images: one [B, H_s, W_s, 3] uint8 batch per scale (B split over the
  devices by its sharding). Returns {'heat' [B, K, H', W'], 'tags'
  [B, K, H', W', L], 'cands': candidates with a leading B}.
  """
  def one(imgs):
    heat, tags = _compute_maps(variables, imgs, **statics)
    return heat, tags, candidates_lib.top_candidates(heat, tags, max_people,
                                                     nms_kernel)

  if images[0].shape[0] == 1:  # no vmap: cheaper on XLA:CPU
    heat, tags, cands = jax.tree_util.tree_map(
        lambda a: a[None], one(tuple(i[0] for i in images)))
  else:
    heat, tags, cands = jax.vmap(one)(images)
  return {'heat': heat, 'tags': tags, 'cands': cands}


def _argmax(heat, tags, index: int, stats: dict) -> refine.ArgmaxFn:
  """Refine's argmax over the maps of image `index` of a batch.

  On XLA:CPU the maps are read as numpy views (no copy) by the host scan,
  whose large scans run jitted; elsewhere the jitted scan runs on the
  device that holds them.
  """
  if all(d.platform == 'cpu' for d in heat.devices()):
    return refine.host_argmax(np.asarray(heat)[index],
                              np.asarray(tags)[index], refine_scan.scan_flat)
  return refine_scan.device_argmax(heat[index], tags[index], stats)


class Predictor:
  """Image -> people: resize-align, jitted maps, host grouping, map back.

  The keyword arguments are the keys of config.test, so a config group
  unpacks straight into it: `Predictor(model, variables, **config.test)`.
  Values are normalised here, once.

  `predict_stream` is the fast path (eval, demo): images of one shape
  bucket run as a batch split over the local devices ('data' mesh); the
  device does the maps and NMS/top-k (candidates.py) and keeps the maps;
  only the candidates, then the maps of the joints refine fills, cross to
  the host, where grouping runs in `num_threads` threads while the device
  computes the next batches. `stats` counts images and device->host bytes.

  Args:
    model: AEModel.
    variables: its {'params', 'batch_stats'}.
    input_size: short side at scale 1 (px).
    scales: test scales, e.g. (2, 1, 0.5); run in descending order, and must
      contain 1 when there are several (tags come from scale 1).
    flip: flip test.
    project2image: resize maps to the scale-1 input size (mmpose's
      project2image).
    grouping: decode.GroupingParams, or a mapping of its fields
      (config.test.grouping).
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index);
      default COCO's, which fits a 17-joint model only.
    batch_size: images per device batch in predict_stream; a multiple of
      the local device count (default: that count).
    num_threads: host grouping threads.
  """

  def __init__(self, model: nn.Module, variables: Any, *,
               input_size: int = 512, scales: Sequence[float] = (1.0,),
               flip: bool = True, project2image: bool = True,
               grouping: Any = decode.GroupingParams(),
               flip_index: Sequence[int] | None = None,
               batch_size: int | None = None, num_threads: int = 2):
    self.scales = tuple(sorted((float(s) for s in scales), reverse=True))
    if not self.scales or min(self.scales) <= 0:
      raise ValueError(f'test scales must be positive, got {self.scales}')
    if len(self.scales) > 1 and 1.0 not in self.scales:
      raise ValueError('multi-scale test needs scale 1 (tags come from it), '
                       f'got {self.scales}')
    if int(input_size) <= 0:
      raise ValueError(f'test input_size must be positive, got {input_size}')
    devices = jax.local_devices()
    batch_size = len(devices) if batch_size is None else int(batch_size)
    if batch_size <= 0 or batch_size % len(devices):
      raise ValueError(f'batch_size {batch_size} is not a positive multiple '
                       f'of the {len(devices)} local devices')
    self.model = model
    self.variables = jax.device_put(variables)
    self.input_size = int(input_size)
    self.flip = bool(flip)
    self.project2image = bool(project2image)
    self.grouping = decode.grouping_params(grouping)
    if flip_index is None:
      flip_index = keypoints.COCO.flip_index
    self.flip_index = tuple(int(j) for j in flip_index)
    if len(self.flip_index) != model.num_joints:
      raise ValueError(f'flip_index has {len(self.flip_index)} joints, the '
                       f'model {model.num_joints} (pass the KeypointSpec\'s)')
    self.batch_size = batch_size
    self.num_threads = max(1, int(num_threads))
    mesh = jax.sharding.Mesh(np.array(devices), (sharding.DATA_AXIS,))
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._mesh_variables = jax.device_put(variables,
                                          sharding.replicated(mesh))
    self._lock = threading.Lock()
    self.stats = {'images': 0, 'bytes_to_host': 0, 'full_map_bytes': 0}

  def _prepare(self, image: np.ndarray):
    """Resized inputs per scale, center/scale and the scale-1 size."""
    min_scale = min(self.scales)
    (base_w, base_h), center, scale = get_multi_scale_size(
        image.shape[0], image.shape[1], self.input_size, 1.0, min_scale)
    resized = tuple(resize_align(image, self.input_size, s, min_scale)
                    for s in self.scales)
    return resized, center, scale, (base_h, base_w)

  def maps(self, image: np.ndarray):
    """Device maps for a [H, W, 3] uint8 RGB image, plus its center/scale.

    Returns:
      (heatmaps [K, H', W'], tags [K, H', W', L]) as jax arrays, center [2]
      and scale [2] of the scale-1 input (get_multi_scale_size), which map
      the maps back to the image.
    """
    resized, center, scale, base_hw = self._prepare(image)
    heat, tags = compute_maps(
        self.variables, resized, model=self.model, scales=self.scales,
        flip=self.flip, base_hw=base_hw, flip_index=self.flip_index,
        project2image=self.project2image)
    return (heat, tags), center, scale

  def _dispatch(self, batch, batch_size: int):
    """Starts the device work of one bucket's batch (asynchronous)."""
    preps = [prep for _, prep in batch]
    preps += [preps[-1]] * (batch_size - len(preps))  # pad: same shapes
    images = tuple(np.stack([p[0][s] for p in preps])
                   for s in range(len(self.scales)))
    if batch_size == 1:
      variables = self.variables
    else:
      variables = self._mesh_variables
      images = jax.device_put(images, self._batch_sharding)
    return compute_batch(
        variables, images, model=self.model, scales=self.scales,
        flip=self.flip, base_hw=preps[0][3], flip_index=self.flip_index,
        project2image=self.project2image,
        max_people=self.grouping.max_people,
        nms_kernel=self.grouping.nms_kernel)

  def _group_batch(self, batch, outs):
    """Host half for one dispatched batch: [(key, poses, scores)]."""
    cands = jax.device_get(outs['cands'])  # waits for the device
    heat, tags = outs['heat'], outs['tags']
    num_joints, height, width = heat.shape[1:]
    moved = sum(v[0].nbytes for v in cands)
    results = []
    for i, (key, (_, center, scale, _)) in enumerate(batch):
      fetched = {'bytes_to_host': moved}
      poses = decode.decode_candidates(
          decode.Candidates(*(v[i] for v in cands)), width, self.grouping,
          _argmax(heat, tags, i, fetched))
      poses = poses.to_image(center, scale, (width, height))
      results.append((key, poses.keypoints, poses.scores))
      with self._lock:
        self.stats['images'] += 1
        self.stats['bytes_to_host'] += fetched['bytes_to_host']
        self.stats['full_map_bytes'] += (heat.nbytes +
                                         tags.nbytes) // heat.shape[0]
    return results

  def predict_stream(self, items: Iterable[Tuple[Hashable, np.ndarray]],
                     batch_size: int | None = None
                     ) -> Iterator[Tuple[Hashable, np.ndarray, np.ndarray]]:
    """(key, [H, W, 3] uint8 RGB image) -> (key, poses, scores), batched.

    Results come in completion order (a bucket's images wait for the bucket
    to fill, or for the end of `items`); images of one shape keep their
    order. Poses and scores are as from `__call__`.
    """
    batch_size = batch_size or self.batch_size
    buckets = collections.OrderedDict()
    pending = collections.deque()
    max_pending = self.num_threads + 1
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:

      def dispatch(shape_key):
        batch = buckets.pop(shape_key)
        outs = self._dispatch(batch, batch_size)
        pending.append(pool.submit(self._group_batch, batch, outs))

      for key, image in items:
        prep = self._prepare(image)
        shape_key = tuple(r.shape for r in prep[0])
        buckets.setdefault(shape_key, []).append((key, prep))
        if len(buckets[shape_key]) == batch_size:
          dispatch(shape_key)
        while pending and (len(pending) > max_pending or pending[0].done()):
          yield from pending.popleft().result()
      for shape_key in list(buckets):
        dispatch(shape_key)
      while pending:
        yield from pending.popleft().result()

  def __call__(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """People in a [H, W, 3] uint8 RGB image.

    Returns:
      poses [P, K, 3] float32 (x, y image px, joint score) and scores [P].
    """
    (_, poses, scores), = self.predict_stream([(0, image)], batch_size=1)
    return poses, scores


def load_predictor(model: nn.Module, ckpt_dir: str, **test) -> Predictor:
  """Predictor(model, variables of `ckpt_dir`, **test).

  Args:
    model: AEModel matching the checkpoint.
    ckpt_dir: converted-variables directory or training workdir
      (checkpoints.restore_variables).
    **test: Predictor keyword arguments (the keys of config.test).

  Raises:
    checkpoints.CheckpointError: a missing or unreadable checkpoint.
  """
  return Predictor(model, checkpoints.restore_variables(ckpt_dir), **test)
