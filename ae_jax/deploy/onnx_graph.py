"""An ONNX graph builder and ONNX twins of the model's layers.

The AE model takes its layers as module defs (models/layers.py); `MODULE_DEFS`
here are twins with the same arguments and variables that, instead of
computing, append ONNX nodes to a `Graph`: `ae_model.AEModel(**MODULE_DEFS)`
applied to a `Value` (a named graph tensor) writes the model's own
architecture as an ONNX graph, with the variables as initializers. No second
definition of the network; the same twin pattern as models/cpu_kernels.py.

Inside the graph tensors are NCHW (ONNX's Conv layout); a `Value` answers
the NHWC questions the model code asks (`x.shape[-1]` = channels, `x + y`,
`x.astype`). Convolutions are ONNX Conv / ConvTranspose and BatchNorm is
BatchNormalization (+ Relu / Clip 0-6), which onnxruntime fuses into the
convolutions when it loads the graph.

Legend: B batch, C channels, H x W spatial; kernels as flax stores them,
[kh, kw, C_in / groups, C_out].
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import numpy as np
import onnx
from onnx import helper
from onnx import numpy_helper

OPSET = 17  # Resize, TopK, GatherElements, BatchNormalization as used here.
INT64_MAX = np.iinfo(np.int64).max


class Graph:
  """Nodes and initializers of one ONNX graph, with fresh names."""

  def __init__(self):
    self.nodes: List[onnx.NodeProto] = []
    self.initializers: List[onnx.TensorProto] = []
    self._count = 0

  def name(self, hint: str) -> str:
    self._count += 1
    return f'{hint}_{self._count}'

  def const(self, value: Any, hint: str = 'const', dtype=None) -> str:
    """An initializer holding `value` (numpy-convertible); its name."""
    name = self.name(hint)
    self.initializers.append(numpy_helper.from_array(
        np.asarray(value, dtype), name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], num_outputs: int = 1,
         hint: Optional[str] = None, **attrs):
    """Appends a node; returns its output name (a tuple if several)."""
    outs = [self.name(hint or op_type.lower()) for _ in range(num_outputs)]
    self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                       name=self.name('n_' + op_type),
                                       **attrs))
    return outs[0] if num_outputs == 1 else tuple(outs)

  def make_model(self, inputs: Sequence[onnx.ValueInfoProto],
                 outputs: Sequence[onnx.ValueInfoProto], name: str,
                 metadata: Dict[str, str]) -> onnx.ModelProto:
    """The checked ModelProto of this graph, metadata in metadata_props."""
    graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs),
                              initializer=self.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', OPSET)],
        producer_name='ae_jax')
    model.ir_version = 8  # onnxruntime >= 1.14 reads it
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


class Value:
  """A float32 NCHW graph tensor seen by the model code as NHWC."""

  def __init__(self, graph: Graph, name: str, channels: int):
    self.graph, self.name, self.channels = graph, name, channels

  @property
  def shape(self) -> Tuple[Optional[int], ...]:
    return (None, None, None, self.channels)

  def astype(self, dtype) -> 'Value':
    """float32 only: the exported graph computes in float32."""
    del dtype  # config.model.dtype bfloat16 exports a float32 graph
    return self

  def __add__(self, other: 'Value') -> 'Value':
    return Value(self.graph, self.graph.op('Add', [self.name, other.name]),
                 self.channels)


def _conv_inputs(module: nn.Module, x: Value, weight: np.ndarray,
                 hint: str) -> List[str]:
  """[x, weight initializer, optional bias initializer] of a conv node."""
  g = x.graph
  inputs = [x.name, g.const(np.ascontiguousarray(weight), hint)]
  if module.use_bias:
    inputs.append(g.const(
        np.asarray(module.get_variable('params', 'bias'), np.float32), 'b'))
  return inputs


def _pads(padding) -> List[int]:
  """((top, bottom), (left, right)) -> ONNX pads [top, left, bottom, right]."""
  (top, bottom), (left, right) = padding
  return [int(top), int(left), int(bottom), int(right)]


class _ConvArgs(nn.Module):
  """The arguments nn.Conv and nn.ConvTranspose share (dtype, kernel_init:
  taken and unused; the graph is float32 and holds the stored kernel)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = ((0, 0), (0, 0))
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Any = None


class OnnxConv(_ConvArgs):
  """nn.Conv's arguments and variables -> an ONNX Conv node."""
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x: Value) -> Value:
    kernel = np.asarray(self.get_variable('params', 'kernel'), np.float32)
    g = x.graph
    inputs = _conv_inputs(self, x, kernel.transpose(3, 2, 0, 1), 'w')  # OIHW
    out = g.op('Conv', inputs, kernel_shape=list(kernel.shape[:2]),
               strides=list(self.strides), pads=_pads(self.padding),
               group=int(self.feature_group_count))
    return Value(g, out, self.features)


class OnnxConvTranspose(_ConvArgs):
  """nn.ConvTranspose (transpose_kernel False) -> ONNX ConvTranspose.

  flax's op is a stride-1 conv of the stride-dilated input with the kernel
  as stored and padding (lo, hi); ONNX's is the gradient form, whose kernel
  is the spatially flipped one with pads k - 1 - lo, k - 1 - hi
  (PyTorch's ConvTranspose2d: the weight convert.py flipped back).
  """

  @nn.compact
  def __call__(self, x: Value) -> Value:
    kernel = np.asarray(self.get_variable('params', 'kernel'), np.float32)
    kh, kw = kernel.shape[:2]
    weight = kernel[::-1, ::-1].transpose(2, 3, 0, 1)  # [C_in, C_out, kh, kw]
    g = x.graph
    inputs = _conv_inputs(self, x, weight, 'wt')
    (top, bottom), (left, right) = self.padding
    out = g.op('ConvTranspose', inputs, kernel_shape=[kh, kw],
               strides=list(self.strides),
               pads=[kh - 1 - top, kw - 1 - left, kh - 1 - bottom,
                     kw - 1 - right])
    return Value(g, out, self.features)


class OnnxBatchNormAct(nn.Module):
  """layers.BatchNormAct (inference) -> BatchNormalization [+ Relu / Clip]."""
  use_running_average: bool = True
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  act: Optional[str] = None

  @nn.compact
  def __call__(self, x: Value) -> Value:
    if not self.use_running_average:
      raise ValueError('the ONNX graph is inference only (train=False)')
    g = x.graph
    get = lambda col, name, hint: g.const(
        np.asarray(self.get_variable(col, name), np.float32), hint)
    out = g.op('BatchNormalization', [
        x.name, get('params', 'scale', 'gamma'), get('params', 'bias', 'beta'),
        get('batch_stats', 'mean', 'mean'), get('batch_stats', 'var', 'var')],
               epsilon=float(self.epsilon))
    if self.act == 'relu':
      out = g.op('Relu', [out])
    elif self.act == 'relu6':
      out = g.op('Clip', [out, g.const(np.float32(0), 'zero'),
                          g.const(np.float32(6), 'six')])
    elif self.act is not None:
      raise ValueError(f'activation must be None, relu or relu6: {self.act}')
    return Value(g, out, x.channels)


MODULE_DEFS = {'conv': OnnxConv, 'deconv': OnnxConvTranspose,
               'norm': OnnxBatchNormAct}
