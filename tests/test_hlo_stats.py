"""hlo_stats: collectives and per-instruction bytes from compiled HLO text."""

from ae_jax import hlo_stats

# A hand-written module in the form `compiled.as_text()` prints on TPU:
# tiled layouts, an on-chip (S(1)) result, a combined all-reduce of a
# tuple, an async all-gather, a fusion calling a convolution.
HLO = """\
HloModule jit_step, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%region_0 (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add = f32[] add(%a, %b)
}

%fused_conv (p0: bf16[4,64,64,32], p1: bf16[3,3,32,32]) -> bf16[4,64,64,32] {
  %p0 = bf16[4,64,64,32]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,32,32]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[4,64,64,32]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

ENTRY %main (param: bf16[4,64,64,32], param.1: bf16[3,3,32,32], param.2: f32[8]) -> f32[8] {
  %param = bf16[4,64,64,32]{3,2,1,0:T(8,128)(2,1)} parameter(0), metadata={op_name="batch"}
  %param.1 = bf16[3,3,32,32]{3,2,1,0:T(8,128)(2,1)} parameter(1)
  %param.2 = f32[8]{0:T(128)} parameter(2)
  %fusion.7 = bf16[4,64,64,32]{3,2,1,0:T(8,128)(2,1)} fusion(%param, %param.1), kind=kOutput, calls=%fused_conv, metadata={op_name="jit(train_step)/transpose(jvp(AEModel))/backbone/conv1/conv/conv_general_dilated" stack_frame_id=3}
  %small = f32[8]{0:T(128)S(1)} add(%param.2, %param.2)
  %all-reduce.3 = (f32[8]{0:T(128)}, f32[16]{0:T(128)}) all-reduce(%param.2, %param.2), channel_id=1, to_apply=%region_0
  %all-gather-start = (f32[8]{0:T(128)}, f32[32]{0:T(128)}) all-gather-start(%param.2), dimensions={0}
  %all-gather-done = f32[32]{0:T(128)} all-gather-done(%all-gather-start)
  %all-reduce.4 = f32[8]{0:T(128)} all-reduce(%small), to_apply=%region_0
  ROOT %tuple = (f32[8]{0}) tuple(%all-reduce.4)
}
"""


def test_shape_bytes_logical_and_tiled():
  # [.., 64, 32] bf16 in (8, 128) tiles: 32 lanes padded to 128 -> 4x.
  shape = 'bf16[4,64,64,32]{3,2,1,0:T(8,128)(2,1)}'
  assert hlo_stats.shape_bytes(shape) == 4 * 64 * 64 * 32 * 2
  assert hlo_stats.shape_bytes(shape, padded=True) == 4 * 64 * 64 * 128 * 2
  # A tuple counts every array; a minor-to-major order other than the
  # default tiles the dimensions that are minor in memory.
  assert hlo_stats.shape_bytes('(f32[8], u32[])') == 36
  assert hlo_stats.shape_bytes('f32[3,5]{0,1:T(8,128)}', padded=True) == (
      4 * 128 * 8)


def test_collectives_by_kind_count_async_once_with_result_bytes():
  stats = hlo_stats.collectives(HLO)
  # The tuple all-reduce counts once with both arrays (8 + 16 floats).
  assert stats['all-reduce'] == (2, (8 + 16 + 8) * 4)
  # all-gather-start/-done count once, with the gathered result.
  assert stats['all-gather'] == (1, 32 * 4)
  assert set(stats) == {'all-reduce', 'all-gather'}


def test_entry_traffic_ranks_the_convolution_fusion_first():
  traffic = hlo_stats.entry_traffic(HLO)
  top = traffic[0]
  assert (top.name, top.opcode, top.kind) == ('fusion.7', 'fusion',
                                              'kOutput')
  assert top.convolution and top.root == 'convolution'
  act, kernel = 4 * 64 * 64 * 32 * 2, 3 * 3 * 32 * 32 * 2
  assert top.nbytes == 2 * act + kernel  # operands + result
  assert top.padded == 2 * act * 4 + 3 * 3 * 32 * 128 * 2
  # Free instructions (parameters, tuple, *-done) are not listed; the
  # add's on-chip result moves no HBM bytes (its operands do).
  names = [t.name for t in traffic]
  assert 'param' not in names and 'tuple' not in names
  assert 'all-gather-done' not in names
  small = traffic[names.index('small')]
  assert small.nbytes == 2 * 8 * 4


def test_short_op_name_and_table():
  name = hlo_stats.short_op_name(
      'jit(train_step)/transpose(jvp(AEModel))/backbone/conv1/conv/x')
  assert name == 'bwd backbone/conv1/conv/x'
  table = hlo_stats.format_top(hlo_stats.entry_traffic(HLO), 2, per=4)
  lines = table.splitlines()
  assert len(lines) == 4 and 'fusion.7' in lines[2]
  assert 'kOutput conv' in lines[2] and 'bwd backbone/conv1' in lines[2]
