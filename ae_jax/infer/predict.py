"""Test-time inference: a jitted predict function, host decode, a driver.

mmpose 0.x bottom-up testing (AssociativeEmbedding.forward_test, then
HeatmapParser.parse) in three plain pieces:
1. `predict_batch` (pure, jitted): per scale (descending) each image and
   its mirror run as one batch; the mirror's maps are flipped back with the
   left/right joint swap. project2image: every map is resized (bilinear,
   half-pixel centres = torch align_corners=False) to the scale-1 input
   size; heatmaps of image and mirror are averaged, their tags kept side by
   side (L=2). Heatmaps are averaged over scales; tags come from scale 1
   only. Then grouping's device half, candidates.top_candidates. The inputs
   come from data/eval_input.resize_inputs (host, cv2); their sides are
   multiples of 64, so an eval compiles once per aspect bucket.
2. `decode_batch` (host): decode.decode_candidates on each image's
   candidates, refine's argmax where the maps are, then image pixels.
3. `Predictor` drives both over a stream of images: the images of one
   shape bucket run as a batch split over the local devices ('data' mesh),
   and the host decode of a batch runs in threads while the device computes
   the next ones.

Legend: B images, H_s x W_s one scale's input, h x w = H_s/4 x W_s/4 model
output, H x W the maps (the scale-1 input size with project2image), K
joints, L tag dim, M = max_people.
"""

import collections
import concurrent.futures
import dataclasses
import functools
from typing import Any, Hashable, Iterable, Iterator, List, NamedTuple
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ae_jax import keypoints
from ae_jax import sharding
from ae_jax.data import eval_input
from ae_jax.infer import candidates
from ae_jax.infer import decode
from ae_jax.infer import refine
from ae_jax.infer import refine_scan
from ae_jax.models import ae_model


@dataclasses.dataclass(frozen=True)
class PredictOptions:
  """config.test, checked and normalised once.

  `PredictOptions(**config.test, flip_index=spec.flip_index)`.

  Attributes:
    input_size: short side at scale 1 (px).
    scales: test scales, kept descending; must contain 1 when there are
      several (tags come from scale 1).
    flip: flip test.
    project2image: resize maps to the scale-1 input size (else to the
      largest scale's output size, as mmpose).
    grouping: decode.GroupingParams, or a mapping of its fields
      (config.test.grouping).
    flip_index: [K] mirrored joint of each joint (KeypointSpec.flip_index);
      default COCO's, which fits a 17-joint model only.
  """
  input_size: int = 512
  scales: Tuple[float, ...] = (1.0,)
  flip: bool = True
  project2image: bool = True
  grouping: decode.GroupingParams = decode.GroupingParams()
  flip_index: Tuple[int, ...] = keypoints.COCO.flip_index

  def __post_init__(self):
    scales = tuple(sorted((float(s) for s in self.scales), reverse=True))
    if not scales or min(scales) <= 0:
      raise ValueError(f'test scales must be positive, got {scales}')
    if len(scales) > 1 and 1.0 not in scales:
      raise ValueError('multi-scale test needs scale 1 (tags come from it), '
                       f'got {scales}')
    if int(self.input_size) <= 0:
      raise ValueError('test input_size must be positive, got '
                       f'{self.input_size}')
    put = functools.partial(object.__setattr__, self)
    put('scales', scales)
    put('input_size', int(self.input_size))
    put('flip', bool(self.flip))
    put('project2image', bool(self.project2image))
    put('grouping', decode.grouping_params(self.grouping))
    put('flip_index', tuple(int(j) for j in self.flip_index))


class BatchOutput(NamedTuple):
  """predict_batch's results, on the device (a pytree).

  heat [B, K, H, W] and tags [B, K, H, W, L] float32 (joint-major, so each
  joint's map is contiguous for refine); candidates: decode.Candidates
  with a leading B.
  """
  heat: jax.Array
  tags: jax.Array
  candidates: decode.Candidates


def resize_bilinear(maps: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[h, w, C] -> [height, width, C] like torch bilinear, align_corners=False.

  For upsampling (always the case here) jax's triangle kernel with edge
  renormalisation equals torch's half-pixel sampling with clamped edges.
  """
  if maps.shape[:2] == (height, width):
    return maps
  return jax.image.resize(maps, (height, width) + maps.shape[2:], 'linear')


def _scale_maps(model: nn.Module, variables, image: jnp.ndarray,
                options: PredictOptions, out_hw: Tuple[int, int] | None):
  """One scale: heatmaps [h', w', K] and tags [h', w', K, L]."""
  num_joints = model.num_joints
  x = ae_model.normalize_images(image)
  batch = jnp.stack([x, x[:, ::-1]]) if options.flip else x[None]
  out = model.apply(variables, batch, train=False)
  heat, tag = out[0, ..., :num_joints], out[0, ..., num_joints:]
  hw = out_hw or heat.shape[:2]
  heat, tag = resize_bilinear(heat, *hw), resize_bilinear(tag, *hw)
  tags = [tag]
  if options.flip:
    flip_index = jnp.asarray(options.flip_index, jnp.int32)
    heat_f = out[1, :, ::-1, :num_joints][..., flip_index]
    tag_f = out[1, :, ::-1, num_joints:][..., flip_index]
    heat_f = resize_bilinear(heat_f, *hw)
    tags.append(resize_bilinear(tag_f, *hw))
    heat = (heat + heat_f) / 2.0
  return heat, jnp.stack(tags, axis=-1)


def _image_maps(variables, images: Tuple[jnp.ndarray, ...],
                model: nn.Module, options: PredictOptions,
                base_hw: Tuple[int, int]):
  """One image's maps over scales: heat [K, H, W], tags [K, H, W, L]."""
  heat_sum, tags = None, None
  out_hw = base_hw if options.project2image else None
  for s, image in zip(options.scales, images):
    heat, tag = _scale_maps(model, variables, image, options, out_hw)
    if out_hw is None:
      out_hw = heat.shape[:2]  # mmpose: sizes of the first (largest) scale
    heat_sum = heat if heat_sum is None else heat_sum + heat
    if s == 1 or len(options.scales) == 1:
      tags = tag
  heat = heat_sum / len(options.scales)
  tags = resize_bilinear(tags, *heat.shape[:2])
  return jnp.transpose(heat, (2, 0, 1)), jnp.transpose(tags, (2, 0, 1, 3))


@functools.partial(jax.jit, static_argnames=('model', 'options', 'base_hw'))
def predict_batch(variables, images: Tuple[jax.Array, ...], *,
                  model: nn.Module, options: PredictOptions,
                  base_hw: Tuple[int, int]) -> BatchOutput:
  """Maps and candidates of a batch of images (pure; jitted).

  Args:
    variables: the model's {'params', 'batch_stats'}.
    images: one [B, H_s, W_s, 3] uint8 RGB batch per scale of
      options.scales (eval_input.resize_inputs); B may be split over
      devices by its sharding.
    model: the AEModel (static).
    options: test options (static).
    base_hw: (H, W) the scale-1 input size (static).

  Returns:
    BatchOutput.
  """
  grouping = options.grouping

  def one(imgs):
    heat, tags = _image_maps(variables, imgs, model, options, base_hw)
    return heat, tags, candidates.top_candidates(
        heat, tags, grouping.max_people, grouping.nms_kernel)

  if images[0].shape[0] == 1:  # no vmap: cheaper on XLA:CPU
    heat, tags, cands = jax.tree_util.tree_map(
        lambda a: a[None], one(tuple(i[0] for i in images)))
  else:
    heat, tags, cands = jax.vmap(one)(images)
  return BatchOutput(heat, tags, cands)


def _image_argmax(heat: jax.Array, tags: jax.Array, index: int,
                  stats: dict) -> refine.ArgmaxFn:
  """Refine's argmax over the maps of image `index` of a batch.

  The maps are read from the device shard that holds them: on XLA:CPU as
  numpy views (no copy) by the host scan, whose large scans run jitted;
  elsewhere by the jitted scan on that device (only its answers cross).
  """
  def local(x):
    for shard in x.addressable_shards:
      start, stop, _ = shard.index[0].indices(x.shape[0])
      if start <= index < stop:
        return shard.data, index - start, shard.device.platform
    raise ValueError(f'image {index} is on no local device')

  (heat, i, platform), (tags, _, _) = local(heat), local(tags)
  if platform == 'cpu':
    return refine.host_argmax(np.asarray(heat)[i], np.asarray(tags)[i],
                              refine_scan.scan_flat)
  return refine_scan.device_argmax(heat[i], tags[i], stats)


def decode_batch(keys: Sequence[Hashable],
                 inputs: Sequence[eval_input.ScaledInputs],
                 out: BatchOutput,
                 grouping: decode.GroupingParams) -> List[decode.Prediction]:
  """Host half for a batch: its first len(keys) images -> Predictions.

  Waits for the device; only the candidates and refine's answers cross.
  """
  cands = jax.device_get(out.candidates)
  _, _, height, width = out.heat.shape
  moved = sum(v[0].nbytes for v in cands)
  map_bytes = (out.heat.nbytes + out.tags.nbytes) // out.heat.shape[0]
  results = []
  for i, (key, x) in enumerate(zip(keys, inputs)):
    stats = {'bytes_to_host': moved}
    poses = decode.decode_candidates(
        decode.Candidates(*(v[i] for v in cands)), width, grouping,
        _image_argmax(out.heat, out.tags, i, stats))
    results.append(decode.Prediction(
        key, poses.to_image(x.center, x.scale, (width, height)),
        stats['bytes_to_host'], map_bytes))
  return results


class Predictor:
  """Images -> people with a model's variables, batched and overlapped.

  Args:
    model: AEModel.
    variables: its {'params', 'batch_stats'}; placed once, replicated over
      the local devices.
    options: PredictOptions (config.test).
    batch_size: images per device batch in `stream`; a multiple of the
      local device count (default: that count).
    num_threads: host decode threads in `stream`.

  Raises:
    ValueError: a batch_size or options.flip_index that does not fit.
  """

  def __init__(self, model: nn.Module, variables: Any,
               options: PredictOptions = PredictOptions(), *,
               batch_size: int | None = None, num_threads: int = 2):
    if len(options.flip_index) != model.num_joints:
      raise ValueError(f'flip_index has {len(options.flip_index)} joints, '
                       f'the model {model.num_joints} (pass the '
                       'KeypointSpec\'s)')
    devices = jax.local_devices()
    batch_size = len(devices) if batch_size is None else int(batch_size)
    if batch_size <= 0 or batch_size % len(devices):
      raise ValueError(f'batch_size {batch_size} is not a positive multiple '
                       f'of the {len(devices)} local devices')
    self.model, self.options = model, options
    self.batch_size, self.num_threads = batch_size, max(1, int(num_threads))
    mesh = jax.sharding.Mesh(np.array(devices), (sharding.DATA_AXIS,))
    self._batch_sharding = sharding.batch_sharding(mesh)
    self.variables = jax.device_put(variables, sharding.replicated(mesh))

  def run(self, inputs: Sequence[eval_input.ScaledInputs],
          batch_size: int) -> BatchOutput:
    """Starts predict_batch on up to batch_size images of one shape.

    The batch is padded to batch_size by repeating the last image; a batch
    of one runs on the first device alone.
    """
    padded = list(inputs) + [inputs[-1]] * (batch_size - len(inputs))
    images = tuple(np.stack([x.images[s] for x in padded])
                   for s in range(len(self.options.scales)))
    if batch_size == 1:  # the first device's copy of the variables
      variables = jax.tree_util.tree_map(lambda a: a.addressable_data(0),
                                         self.variables)
    else:
      variables = self.variables
      images = jax.device_put(images, self._batch_sharding)
    return predict_batch(variables, images, model=self.model,
                         options=self.options, base_hw=padded[0].base_hw)

  def stream(self, items: Iterable[Tuple[Hashable, np.ndarray]]
             ) -> Iterator[decode.Prediction]:
    """(key, [H, W, 3] uint8 RGB image) -> Predictions, batched.

    Results come in completion order (a bucket's images wait for the bucket
    to fill, or for the end of `items`); images of one shape keep their
    order.
    """
    buckets = collections.OrderedDict()
    pending = collections.deque()
    max_pending = self.num_threads + 1
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:

      def dispatch(shapes):
        keys, inputs = zip(*buckets.pop(shapes))
        out = self.run(inputs, self.batch_size)
        pending.append(pool.submit(decode_batch, keys, inputs, out,
                                   self.options.grouping))

      for key, image in items:
        x = eval_input.resize_inputs(image, self.options.input_size,
                                     self.options.scales)
        buckets.setdefault(x.shapes, []).append((key, x))
        if len(buckets[x.shapes]) == self.batch_size:
          dispatch(x.shapes)
        while pending and (len(pending) > max_pending or pending[0].done()):
          yield from pending.popleft().result()
      for shapes in list(buckets):
        dispatch(shapes)
      while pending:
        yield from pending.popleft().result()

  def __call__(self, image: np.ndarray) -> decode.Poses:
    """People in one [H, W, 3] uint8 RGB image (image pixels)."""
    x = eval_input.resize_inputs(image, self.options.input_size,
                                 self.options.scales)
    return decode_batch([None], [x], self.run([x], 1),
                        self.options.grouping)[0].poses
