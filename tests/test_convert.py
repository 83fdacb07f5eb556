"""Conversion parity: PyTorch reference checkpoint -> CLI -> Flax, same maps.

The reference is tests/references/torch_model.py, an independent PyTorch
model with mmpose's state_dict names, randomised (weights and BN statistics)
so that a wrong layout, a swapped mean/var or an unflipped deconv kernel
shows up.

Legend: B batch, H x W input, K joints (17: COCO); Flax NHWC, torch NCHW.
Inputs [B, H, W, 3] float32 ImageNet-normalised RGB (real mini COCO images);
outputs [B, H/4, W/4, 2K] (heatmaps then tags).
"""

import json
import os
import pickle
import re
import subprocess
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ae_jax.train import checkpoints
from ae_jax import convert
from ae_jax import keypoints
from ae_jax.train import state as train_state
from ae_jax.models import ae_model

torch = pytest.importorskip('torch')
from tests.references import torch_model  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO_ROOT, 'convert_torch_weights.py')
PARAM_COUNT = 9_574_178
FP32_TOLERANCE = 1e-4  # the parity bar: max abs diff on the 34 maps, fp32
# bfloat16 compute (8-bit mantissa, ~55 layers): max abs diff to float32 at
# most 3% of the float32 output range, mean abs diff at most 0.5% of it.
BF16_MAX_FRACTION = 0.03
BF16_MEAN_FRACTION = 0.005


def run_cli(*args):
  """Runs convert_torch_weights.py in a fresh interpreter (as a user does)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  return subprocess.run([sys.executable, CLI, *map(str, args)], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


def load_images(coco_root, height, width):
  """All mini COCO images, resized to [B, height, width, 3], normalised."""
  folder = coco_root / 'val2017'
  images = []
  for name in sorted(os.listdir(folder)):
    bgr = cv2.imread(str(folder / name), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)
    images.append((rgb.astype(np.float32) / 255 - keypoints.IMAGENET_MEAN) /
                  keypoints.IMAGENET_STD)
  return np.stack(images).astype(np.float32)


def torch_forward(model, images):
  """NHWC numpy -> torch NCHW forward (eval) -> NHWC numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def pose_checkpoint(tmp_path_factory):
  """A randomised full-size reference, saved mmpose-style, converted once."""
  tmp = tmp_path_factory.mktemp('pose')
  model = torch_model.randomize_(torch_model.AETorchModel(), seed=0)
  pth = tmp / 'ae_mobilenetv2_random.pth'
  torch_model.save_mmpose_checkpoint(str(pth), model)
  result = run_cli(pth, tmp / 'flax')
  assert result.returncode == 0, result.stderr
  return {'model': model, 'pth': pth, 'flax_dir': tmp / 'flax',
          'stdout': result.stdout, 'outputs': {}}


@pytest.fixture(scope='module')
def flax_forward(pose_checkpoint):
  """jitted AEModel forward per dtype, with the converted weights."""
  variables = checkpoints.restore_variables(str(pose_checkpoint['flax_dir']))
  fns = {}

  def forward(images, dtype='float32'):
    if dtype not in fns:
      model = ae_model.AEModel(dtype=dtype)
      fns[dtype] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(fns[dtype](variables, jnp.asarray(images)))

  return forward


def test_cli_reports_pose_conversion(pose_checkpoint):
  stdout = pose_checkpoint['stdout']
  print(stdout)
  assert 'converted pose checkpoint' in stdout
  # 332 tensors = 277 weights/statistics + 55 num_batches_tracked.
  assert '277 used, 55 dropped' in stdout
  assert f'{PARAM_COUNT:,}' in stdout
  # The checkpoint records the model and --config's keypoints (COCO).
  record = checkpoints.read_checkpoint(pose_checkpoint['flax_dir']).record
  assert record == checkpoints.Record(
      {'widen_factor': 1.0, 'num_deconv_filters': (256, 256, 256),
       'num_joints': 17, 'dtype': 'float32'}, keypoints.COCO)


@pytest.mark.parametrize('height,width', [(512, 512), (512, 768)])
def test_float32_parity_on_mini_coco(pose_checkpoint, flax_forward,
                                     coco_mini_root, height, width):
  images = load_images(coco_mini_root, height, width)
  if width != height:
    images = images[:2]  # the non-square run checks shapes, not statistics
  expected = torch_forward(pose_checkpoint['model'], images)
  pose_checkpoint['outputs'][(height, width)] = (images, expected)
  got = flax_forward(images)
  assert got.shape == (len(images), height // 4, width // 4, 34)
  diff = np.abs(got - expected)
  print(f'{height}x{width}: max abs diff {diff.max():.2e}, mean '
        f'{diff.mean():.2e}; torch output |max| {np.abs(expected).max():.2f}, '
        f'std {expected.std():.2f}')
  assert diff.max() <= FP32_TOLERANCE


def test_bfloat16_stays_close_to_float32(pose_checkpoint, flax_forward,
                                         coco_mini_root):
  key = (512, 512)
  if key not in pose_checkpoint['outputs']:  # test run alone
    images = load_images(coco_mini_root, *key)
    pose_checkpoint['outputs'][key] = (
        images, torch_forward(pose_checkpoint['model'], images))
  images, expected = pose_checkpoint['outputs'][key]
  images, expected = images[:2], expected[:2]
  got = flax_forward(images, 'bfloat16')
  assert got.dtype == np.float32
  value_range = expected.max() - expected.min()
  diff = np.abs(got - expected)
  print(f'bfloat16 vs float32 torch at 512x512: max abs diff '
        f'{diff.max():.3f} ({diff.max() / value_range:.2%} of range '
        f'{value_range:.2f}), mean {diff.mean():.4f} '
        f'({diff.mean() / value_range:.3%})')
  assert diff.max() <= BF16_MAX_FRACTION * value_range
  assert diff.mean() <= BF16_MEAN_FRACTION * value_range


def test_param_counts_match_torch_reference():
  torch_count = torch_model.count_parameters(torch_model.AETorchModel())
  variables = jax.eval_shape(lambda: ae_model.AEModel().init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  flax_count = ae_model.count_params(variables['params'])
  print(f'parameters: torch {torch_count:,}, flax {flax_count:,}')
  assert torch_count == flax_count == PARAM_COUNT


def test_transposed_conv_kernels_are_flipped_for_the_model():
  """The head's ConvTranspose2d weights, flipped, drive the model's deconvs.

  Written out here: [I, O, kh, kw] -> [kh, kw, I, O] with kh, kw reversed.
  The model (whatever layer it runs) matches torch with these kernels and
  not with the unflipped ones, so the flip is needed, not just harmless.
  """
  model = torch_model.randomize_(
      torch_model.AETorchModel(0.25, (8, 8, 8)), seed=4)
  result = convert.convert_state_dict(model.state_dict(), widen_factor=0.25,
                                      num_deconv_filters=(8, 8, 8),
                                      num_joints=17)
  head = result.variables['params']['keypoint_head']
  for i in (0, 3, 6):
    weight = model.state_dict()[f'keypoint_head.deconv_layers.{i}.weight']
    np.testing.assert_array_equal(
        head[f'deconv_layers_{i}']['kernel'],
        weight.numpy().transpose(2, 3, 0, 1)[::-1, ::-1])
  images = np.random.default_rng(2).normal(
      size=(1, 64, 64, 3)).astype(np.float32)
  expected = torch_forward(model, images)
  apply = jax.jit(ae_model.AEModel(**result.model_kwargs).apply)
  np.testing.assert_allclose(apply(result.variables, images), expected,
                             atol=FP32_TOLERANCE)
  unflipped = jax.tree_util.tree_map_with_path(
      lambda path, x: x[::-1, ::-1] if convert.is_transposed_conv(
          tuple(k.key for k in path)) else x, result.variables)
  assert not np.allclose(apply(unflipped, images), expected, atol=1e-2)


@pytest.mark.parametrize('kernels', ['flax', 'cpu'])
def test_transposed_conv_kernel_is_flipped_and_transposed(kernels):
  """PyTorch ConvTranspose2d(4, 2, pad 1) == the deconv AEHead builds."""
  from ae_jax.models import ae_head  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)  # [I, O, kh, kw]
  x = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
  deconv = torch.nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1, bias=False)
  deconv.weight.data = torch.from_numpy(weight)
  with torch.no_grad():
    expected = deconv(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  expected = expected.numpy().transpose(0, 2, 3, 1)
  path = ('params', 'keypoint_head', 'deconv_layers_0', 'kernel')
  kernel = convert.convert_tensor(path, weight)
  layer = ae_head.deconv_4x4_s2(ae_model.module_defs(kernels)['deconv'],
                                jnp.float32)(3)
  got = layer.apply({'params': {'kernel': kernel}}, x)
  assert got.shape == expected.shape == (2, 12, 14, 3)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  # Without the flip the result differs: the test can tell.
  unflipped = np.ascontiguousarray(weight.transpose(2, 3, 0, 1))
  assert not np.allclose(
      layer.apply({'params': {'kernel': unflipped}}, x), expected, atol=1e-2)


def test_small_model_parity_with_inferred_architecture():
  """In-process conversion of a narrow model; sizes taken from the weights."""
  model = torch_model.randomize_(
      torch_model.AETorchModel(0.5, (24, 16, 8), num_joints=17), seed=3)
  # DataParallel's `module.` prefix is stripped.
  result = convert.convert_state_dict(
      {f'module.{k}': v for k, v in model.state_dict().items()})
  assert result.kind == convert.POSE
  assert result.model_kwargs == {'widen_factor': 0.5, 'num_joints': 17,
                                 'num_deconv_filters': (24, 16, 8)}
  assert result.num_params == torch_model.count_parameters(model)
  images = np.random.default_rng(1).normal(
      size=(2, 64, 96, 3)).astype(np.float32)
  expected = torch_forward(model, images)
  model_apply = jax.jit(ae_model.AEModel(**result.model_kwargs).apply)
  got = model_apply(result.variables, images)
  np.testing.assert_allclose(got, expected, atol=FP32_TOLERANCE)


def test_imagenet_checkpoint_fills_backbone_only(tmp_path):
  classifier = torch_model.randomize_(
      torch_model.MobileNetV2Classifier(1.0, num_classes=1000), seed=1)
  pth = tmp_path / 'mobilenet_v2_imagenet_random.pth'
  torch_model.save_mmpose_checkpoint(str(pth), classifier,
                                         meta={'mmcls_version': '0.1.0'})
  result = run_cli(pth, tmp_path / 'backbone')
  assert result.returncode == 0, result.stderr
  assert 'converted imagenet checkpoint' in result.stdout
  variables = checkpoints.restore_variables(str(tmp_path / 'backbone'))

  # Exactly the AEModel backbone tree: same leaves, same shapes, no head.
  abstract = jax.eval_shape(lambda: ae_model.AEModel().init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  for col in ('params', 'batch_stats'):
    assert set(variables[col]) == {'backbone'}
    want = jax.tree_util.tree_map(lambda a: a.shape,
                                  abstract[col]['backbone'])
    got = jax.tree_util.tree_map(np.shape, variables[col]['backbone'])
    assert got == want
  # Values: every torch backbone tensor lands, unchanged up to the layout,
  # at its Flax address (written out here independently of convert.py).
  num_checked = 0
  for key, value in classifier.state_dict().items():
    if not key.startswith('backbone.') or key.endswith('num_batches_tracked'):
      continue
    names = re.sub(r'\.(\d+)', r'_\1', key).split('.')  # layer2.1 -> layer2_1
    col, leaf = {'running_mean': ('batch_stats', 'mean'),
                 'running_var': ('batch_stats', 'var'),
                 'bias': ('params', 'bias')}.get(
                     names[-1],
                     ('params', 'kernel' if value.ndim == 4 else 'scale'))
    node = variables[col]
    for name in names[:-1]:
      node = node[name]
    expected = value.numpy()
    if value.ndim == 4:  # [O, I, kh, kw] -> [kh, kw, I, O]; depthwise I = 1
      expected = expected.transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(node[leaf], expected, err_msg=key)
    num_checked += 1
  assert num_checked == len(jax.tree_util.tree_leaves(variables)) == 260

  # Training init (config.train.init_checkpoint) takes it: backbone replaced,
  # head untouched.
  zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype),
                                 abstract)
  state = train_state.TrainState.create(
      apply_fn=None, params=zeros['params'], tx=optax.sgd(0.1),
      batch_stats=zeros['batch_stats'])
  state, loaded = train_state.load_pretrained(state, variables, str(pth))
  assert 'backbone-only' in loaded
  np.testing.assert_array_equal(
      state.params['backbone']['conv1']['conv']['kernel'],
      variables['params']['backbone']['conv1']['conv']['kernel'])
  np.testing.assert_array_equal(
      state.batch_stats['backbone']['conv2']['bn']['mean'],
      variables['batch_stats']['backbone']['conv2']['bn']['mean'])
  assert not np.any(state.params['keypoint_head']['final_layer']['kernel'])


def _resnet_state_dict():
  """A few keys of mmpose's ResNet-50 AE model: another architecture."""
  g = torch.Generator().manual_seed(0)
  shapes = {'backbone.conv1.weight': (64, 3, 7, 7),
            'backbone.bn1.weight': (64,), 'backbone.bn1.bias': (64,),
            'backbone.bn1.running_mean': (64,),
            'backbone.bn1.running_var': (64,),
            'backbone.layer1.0.conv1.weight': (64, 64, 1, 1),
            'keypoint_head.deconv_layers.0.weight': (2048, 256, 4, 4),
            'keypoint_head.final_layer.weight': (34, 256, 1, 1),
            'keypoint_head.final_layer.bias': (34,)}
  return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _make_bad_input(kind, tmp_path, pose_pth):
  """Writes one bad input file; returns (path, expected stderr fragment)."""
  path = tmp_path / f'{kind}.pth'
  if kind == 'missing':
    return path, 'not found'
  if kind == 'text':
    path.write_text('not a checkpoint\n')
    return path, 'is not a PyTorch checkpoint'
  if kind == 'truncated':
    data = pose_pth.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path, 'truncated or corrupt'
  if kind == 'pickled_module':  # full nn.Module pickle, not weights only
    torch.save(torch.nn.Linear(2, 2), str(path))
    return path, 'not a weights-only checkpoint'
  if kind in ('pickled_code', 'pickled_code_protocol4'):
    # A callable that would create a file if the pickle were ever run.
    payload = {'state_dict': {'w': torch.zeros(1)},
               'x': _MakeDir(str(tmp_path / 'pwned'))}
    if kind == 'pickled_code':
      torch.save(payload, str(path))  # zip archive, pickle protocol 2
    else:
      path.write_bytes(pickle.dumps(payload, protocol=4))  # legacy pickle
    return path, 'pickles code or objects'
  if kind == 'resnet':
    torch.save({'state_dict': _resnet_state_dict()}, str(path))
    return path, 'unexpected: backbone.conv1.weight'
  if kind == 'head_width':  # the paper backbone with a 128-wide head
    model = torch_model.AETorchModel(1.0, (128, 128, 128))
    torch_model.save_mmpose_checkpoint(str(path), model)
    return path, ('set config.model.num_deconv_filters=(128, 128, 128) (16 '
                  'tensors differ, e.g. keypoint_head.deconv_layers.0.weight '
                  '[1280, 128, 4, 4] vs model [1280, 256, 4, 4])')
  if kind == 'other_width':  # a half-width model for 5 joints
    model = torch_model.AETorchModel(0.5, (16, 16, 16), num_joints=5)
    torch_model.save_mmpose_checkpoint(str(path), model)
    return path, ('set config.model.num_deconv_filters=(16, 16, 16), '
                  '5 joints (config.data.keypoints), '
                  'config.model.widen_factor=0.5')
  raise ValueError(kind)


@pytest.mark.parametrize('kind', [
    'missing',  # no such file
    'text',  # a text file named .pth
    'truncated',  # first half of a valid checkpoint
    'pickled_module',  # needs full unpickling, refused by weights_only
    'pickled_code',  # a callable in the pickle (torch 2.13's wording)
    'pickled_code_protocol4',  # the same as a protocol-4 legacy pickle
    'resnet',  # mmpose checkpoint of another backbone
    'head_width',  # MobileNetV2 AE with 128 deconv filters
    'other_width',  # widen_factor 0.5, 16-wide head, 5 joints
])
def test_cli_rejects_bad_input_in_one_line(kind, tmp_path, pose_checkpoint):
  path, fragment = _make_bad_input(kind, tmp_path, pose_checkpoint['pth'])
  result = run_cli(path, tmp_path / 'out')
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  print(result.stderr)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  assert len(lines) == 1 and lines[0].startswith('error: ')
  assert fragment in lines[0]
  assert not (tmp_path / 'out').exists()  # nothing half-written
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]
  assert not (tmp_path / 'pwned').exists()  # a pickled callable never ran


class _MakeDir:
  """Unpickles as os.mkdir(path): code that must never run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def test_conversion_error_lists_missing_unexpected_and_mismatched():
  state = torch_model.AETorchModel(0.25, (8, 8, 8)).state_dict()
  state = {k: v.numpy() for k, v in state.items()}
  del state['backbone.conv2.bn.running_var']
  state['keypoint_head.extra.weight'] = np.zeros((3,), np.float32)
  state['keypoint_head.final_layer.bias'] = np.zeros((5,), np.float32)
  with pytest.raises(convert.ConversionError) as info:
    convert.convert_state_dict(state, widen_factor=0.25,
                               num_deconv_filters=(8, 8, 8), num_joints=17)
  error = info.value
  assert error.missing == ['backbone.conv2.bn.running_var']
  assert error.unexpected == ['keypoint_head.extra.weight']
  assert error.mismatched == [
      'keypoint_head.final_layer.bias [5] vs model [34]']
  assert 'backbone.conv2.bn.running_var' in str(error)


def test_models_cli_count_equals_torch_reference(capsys):
  # pylint: disable-next=g-import-not-at-top
  from ae_jax.models import __main__ as models_cli
  assert models_cli.main(['--widen_factor=0.5',
                          '--num_deconv_filters=32,16,8']) == 0
  out = capsys.readouterr().out
  expected = torch_model.count_parameters(
      torch_model.AETorchModel(0.5, (32, 16, 8)))
  assert f'parameters: {expected:,}' in out


def test_eval_cli_runs_on_converted_checkpoint(pose_checkpoint, coco_mini_root,
                                              tmp_path):
  """convert_torch_weights.py output -> eval.py on the mini COCO, end to end."""
  out = tmp_path / 'results.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, 'eval.py', '--config', 'configs/coco512.py', '--ckpt',
       str(pose_checkpoint['flax_dir']), '--coco_root', str(coco_mini_root),
       '--config.test.input_size=128', '--output', str(out)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'COCO val2017 keypoints, 4 images' in proc.stdout
  assert '| AP | AP50 | AP75 | APm | APl | AR | AR50 |' in proc.stdout
  assert isinstance(json.loads(out.read_text()), list)

