"""int8 post-training static quantisation of an exported ONNX graph.

onnxruntime's quantize_static: the convolutions' weights to int8 (per
output channel) and their inputs to uint8 with ranges calibrated (MinMax)
on a handful of images run through the float graph; QDQ format (Quantize /
DequantizeLinear pairs that onnxruntime fuses into int8 kernels). The rest
of the graph (resize, NMS, top-k, gathers) stays float32, so the candidate
and map outputs keep their meaning. The metadata is carried over.
"""

from typing import Iterable

import numpy as np
import onnx

from ae_jax.data import eval_input

QUANTIZED_OPS = ('Conv', 'ConvTranspose')


def quantize_int8(float_path: str, out_path: str,
                  images: Iterable[np.ndarray], input_size: int) -> str:
  """Writes the int8 version of float_path to out_path; returns out_path.

  images: [H, W, 3] uint8 RGB calibration images, resize-aligned here to
  the graph's test size (input_size, scale 1) as the predictor feeds them.
  """
  # optional: onnxruntime comes with the deploy extra
  from onnxruntime import quantization  # pylint: disable=g-import-not-at-top

  feeds = [{'images': eval_input.resize_inputs(im, input_size,
                                               (1.0,)).images[0][None]}
           for im in images]

  class Reader(quantization.CalibrationDataReader):

    def __init__(self):
      self._feeds = iter(feeds)

    def get_next(self):
      return next(self._feeds, None)

  quantization.quantize_static(
      float_path, out_path, Reader(),
      quant_format=quantization.QuantFormat.QDQ,
      op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True,
      activation_type=quantization.QuantType.QUInt8,
      weight_type=quantization.QuantType.QInt8,
      calibrate_method=quantization.CalibrationMethod.MinMax)
  quantized = onnx.load(out_path)
  meta = {p.key: p.value for p in onnx.load(float_path,
                                             load_external_data=False
                                             ).metadata_props}
  meta['ae_jax.quantization'] = (f'int8 static, QDQ, per-channel weights, '
                                 f'{len(feeds)} calibration images')
  onnx.helper.set_model_props(quantized, meta)
  onnx.save(quantized, out_path)
  return out_path
