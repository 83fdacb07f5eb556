"""Independent PyTorch reference of mmpose's AE + MobileNetV2.

Written from the published architectures (MobileNetV2, Sandler et al. 2018;
the Simple Baselines deconvolution head, Xiao et al. 2018, that mmpose 0.x's
AESimpleHead uses), not from mmpose's code: no mmpose/mmcv/mmcls imports.
Module attribute names are chosen so that `state_dict()` keys are exactly
mmpose's:

  backbone.conv1.{conv,bn}.*                  stem ConvModule (conv, bn)
  backbone.layer{i}.{j}.conv.{k}.{conv,bn}.*  inverted residual blocks; k in
                                              0..2 (0..1 when expand ratio 1)
  backbone.conv2.{conv,bn}.*                  1x1 conv to 1280 channels
  keypoint_head.deconv_layers.{0,3,6}.weight  ConvTranspose2d [in, out, 4, 4]
  keypoint_head.deconv_layers.{1,4,7}.*       BatchNorm2d
  keypoint_head.final_layer.{weight,bias}     1x1 Conv2d -> 2K maps

`MobileNetV2Classifier` has mmcls' ImageClassifier layout (`backbone.*` and
`head.fc.{weight,bias}` of LinearClsHead; the GAP neck has no parameters), to
make ImageNet-style checkpoints in tests.

Legend (PyTorch NCHW here): B batch, H x W input, K=17 joints.
Input [B, 3, H, W] float32 ImageNet-normalised RGB; AETorchModel output
[B, 2K, H/4, W/4] (heatmaps then tags). Used by tests/test_convert.py and by
benchmarks (`from tests.references.torch_model import AETorchModel`).
"""

import math
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

# (expand ratio t, channels c, repeats n, first stride s): Table 2 of the
# MobileNetV2 paper (Sandler et al., CVPR 2018).
ARCH_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def round_channels(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of 8, never below 90% of it."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


class ConvModule(nn.Module):
  """conv (no bias) -> BatchNorm -> optional ReLU6, named `conv` and `bn`."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1,
               groups: int = 1, act: bool = True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2,
                          groups=groups, bias=False)
    self.bn = nn.BatchNorm2d(cout)  # eps 1e-5, momentum 0.1 as mmpose.
    self.act = nn.ReLU6() if act else nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.act(self.bn(self.conv(x)))


class InvertedResidual(nn.Module):
  """[1x1 expand, ReLU6] -> 3x3 depthwise, ReLU6 -> 1x1 linear (+ identity)."""

  def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
    super().__init__()
    hidden = int(round(cin * expand_ratio))
    layers = []
    if expand_ratio != 1:
      layers.append(ConvModule(cin, hidden, 1))
    layers.append(ConvModule(hidden, hidden, 3, stride, groups=hidden))
    layers.append(ConvModule(hidden, cout, 1, act=False))
    self.conv = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv(x)
    return x + y if self.residual else y


class MobileNetV2(nn.Module):
  """Backbone returning only the stride-32 conv2 output (out_indices=(7,))."""

  def __init__(self, widen_factor: float = 1.0):
    super().__init__()
    cin = round_channels(32 * widen_factor)
    self.conv1 = ConvModule(3, cin, 3, stride=2)
    self.stage_names = []
    for i, (t, c, n, s) in enumerate(ARCH_SETTINGS):
      cout = round_channels(c * widen_factor)
      blocks = []
      for j in range(n):
        blocks.append(InvertedResidual(cin, cout, s if j == 0 else 1, t))
        cin = cout
      self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
      self.stage_names.append(f'layer{i + 1}')
    self.out_channels = (int(1280 * widen_factor) if widen_factor > 1.0
                         else 1280)
    self.conv2 = ConvModule(cin, self.out_channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.conv1(x)
    for name in self.stage_names:
      x = getattr(self, name)(x)
    return self.conv2(x)


class AEHead(nn.Module):
  """3 x (ConvTranspose 4x4/2 pad 1, no bias -> BN -> ReLU) + 1x1 conv."""

  def __init__(self, cin: int, num_joints: int = 17,
               num_deconv_filters: Sequence[int] = (256, 256, 256)):
    super().__init__()
    layers = []
    for features in num_deconv_filters:
      layers += [nn.ConvTranspose2d(cin, features, 4, stride=2, padding=1,
                                    output_padding=0, bias=False),
                 nn.BatchNorm2d(features), nn.ReLU()]
      cin = features
    self.deconv_layers = nn.Sequential(*layers)
    # tag_per_joint: K heatmaps + K tag maps.
    self.final_layer = nn.Conv2d(cin, 2 * num_joints, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.final_layer(self.deconv_layers(x))


class AETorchModel(nn.Module):
  """mmpose AssociativeEmbedding(MobileNetV2, AESimpleHead) forward."""

  def __init__(self, widen_factor: float = 1.0,
               num_deconv_filters: Sequence[int] = (256, 256, 256),
               num_joints: int = 17):
    super().__init__()
    self.backbone = MobileNetV2(widen_factor)
    self.keypoint_head = AEHead(self.backbone.out_channels, num_joints,
                                num_deconv_filters)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 2K, H/4, W/4]."""
    return self.keypoint_head(self.backbone(x))


class LinearClsHead(nn.Module):
  """mmcls LinearClsHead: one `fc` layer on the pooled features."""

  def __init__(self, cin: int, num_classes: int):
    super().__init__()
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(x)


class MobileNetV2Classifier(nn.Module):
  """mmcls ImageClassifier: backbone -> global average pool -> head.fc."""

  def __init__(self, widen_factor: float = 1.0, num_classes: int = 1000):
    super().__init__()
    self.backbone = MobileNetV2(widen_factor)
    self.head = LinearClsHead(self.backbone.out_channels, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> logits [B, num_classes]."""
    return self.head(self.backbone(x).mean(dim=(2, 3)))


def count_parameters(model: nn.Module) -> int:
  """Trainable scalars (conv/BN/linear weights; no BN running statistics)."""
  return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Fills every weight and BN statistic with O(1)-preserving random values.

  Convs get normal weights with std sqrt(gain / fan_in) (a transposed conv's
  fan-in is in_channels * (k / stride)^2): gain 1.44 before a ReLU/ReLU6 and
  0.72 before none, i.e. 0.85^2 of kaiming's 2 and 1; the final layer and the
  classifier keep gain 1. At full kaiming gain this random net sits in an
  amplifying regime (outputs ~11, float32 rounding grown to ~1e-4 in torch
  itself); at 0.85 activations stay O(1) through the ~55 layers (output std
  ~0.9, max ~4 on normalised images) and float32 torch is ~5e-6 from a
  float64 run, so the 1e-4 parity tolerance tests the mapping, not luck.
  BN: scale U(0.5, 1.5), bias N(0, 0.2), running mean N(0, 0.2), running var
  U(0.5, 1.5) (non-trivial, so a swapped mean/var or scale/bias shows up).

  Args:
    model: any module of this file; modified in place.
    seed: torch generator seed.

  Returns:
    The same module, in eval mode.
  """
  gen = torch.Generator().manual_seed(seed)

  def normal(t, std, mean=0.0):
    t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

  def uniform(t, low, high):
    t.copy_(torch.rand(t.shape, generator=gen) * (high - low) + low)

  # Convs followed by no activation: the linear 1x1 of each block.
  linear = {id(m.conv) for m in model.modules()
            if isinstance(m, ConvModule) and isinstance(m.act, nn.Identity)}
  final = {id(m.final_layer) for m in model.modules() if isinstance(m, AEHead)}
  for m in model.modules():
    if id(m) in final or isinstance(m, nn.Linear):
      gain = 1.0
    else:
      gain = 0.72 if id(m) in linear else 1.44
    if isinstance(m, nn.ConvTranspose2d):
      cin, _, kh, kw = m.weight.shape
      fan_in = cin * kh * kw / (m.stride[0] * m.stride[1])
      normal(m.weight, math.sqrt(gain / fan_in))
    elif isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      normal(m.weight, math.sqrt(gain / fan_in))
      if m.bias is not None:
        normal(m.bias, 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      uniform(m.weight, 0.5, 1.5)
      normal(m.bias, 0.2)
      normal(m.running_mean, 0.2)
      uniform(m.running_var, 0.5, 1.5)
      m.num_batches_tracked.fill_(1000)
  return model.eval()


def save_mmpose_checkpoint(path: str, model: nn.Module,
                           meta: Optional[Dict[str, Any]] = None) -> None:
  """Writes {'meta': ..., 'state_dict': ...} as mmcv's save_checkpoint does."""
  state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  meta = dict(meta or {})
  meta.setdefault('mmpose_version', '0.29.0')
  meta.setdefault('torch_version', str(torch.__version__))  # plain str:
  # TorchVersion is not allowed by torch.load(weights_only=True).
  torch.save({'meta': meta, 'state_dict': state_dict}, path)
