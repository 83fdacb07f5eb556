"""TensorFlow's stateless random ops, bit for bit, in numpy (no TF import).

The train stream's shuffle and augmentation draws were defined with
`tf.random.experimental.stateless_fold_in`, `tf.random.stateless_uniform`
and `tf.random.experimental.stateless_shuffle` (Philox4x32-10, TF's CPU
algorithm). The input worker processes compute them here instead, so they
start without TensorFlow (~3 s and ~670 MB per process) and a run keeps
exactly the stream it had: tests/test_data_stateless_random.py compares
every function with TF's own op.

What TF does (tensorflow/core/kernels/stateless_random_ops*.cc,
random_distributions.h, random_shuffle_op.cc), reproduced below:
  * a seed pair (s0, s1) of int64 is scrambled into a Philox key and a
    counter: counter (lo s0, hi s0, lo s1, hi s1) is encrypted under the
    fixed key (0x3ec8f720, 0x02461e29); its words 0-1 are the key, words
    2-3 the counter's high half (the low half starts at 0);
  * each Philox call returns 4 uint32 and advances the 128-bit counter by 1;
  * a float32 in [0, 1) is the 23 low bits of a uint32 as the mantissa of
    a float in [1, 2), minus 1; a full-range int64 is (u0 | u1 << 32);
  * fold_in(seed, data) = (full-range int64 drawn from seed, data);
  * shuffle is a forward Fisher-Yates: for i in 0 .. n - 2, swap a[i]
    with a[i + u_i % (n - i)], u_i the i-th uint32 of the stream.

Shapes: n the number of seeds drawn for at once; seeds are [n] int64
arrays (or scalars); outputs [n, ...].
"""

import numpy as np

_MASK = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_MUL_A, _MUL_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_KEY_A, _KEY_B = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_SCRAMBLE_KEY = (np.uint64(0x3EC8F720), np.uint64(0x02461E29))
_INT32_MAX = 2**31 - 1


def _philox(counter, key):
  """One Philox4x32-10 block per counter: 4 x [n] uint32 (held in uint64)."""
  c0, c1, c2, c3 = counter
  k0, k1 = key
  for _ in range(10):
    p0, p1 = _MUL_A * c0, _MUL_B * c2  # 32 x 32 -> 64-bit products
    c0, c1, c2, c3 = ((p1 >> _SHIFT) ^ c1 ^ k0, p1 & _MASK,
                      (p0 >> _SHIFT) ^ c3 ^ k1, p0 & _MASK)
    k0, k1 = (k0 + _KEY_A) & _MASK, (k1 + _KEY_B) & _MASK
  return c0, c1, c2, c3


def _add_to_counter(counter, n):
  """The 128-bit counter (4 x uint32 words, low first) plus n ([m] or int)."""
  words, carry = [], np.asarray(n, np.uint64)
  for c in counter:
    total = c + carry
    words.append(total & _MASK)
    carry = total >> _SHIFT
  return tuple(words)


def _key_counter(seed0, seed1):
  """TF's GenerateKey: an int64 seed pair -> (key, counter) per seed."""
  s0 = np.asarray(seed0, np.int64).view(np.uint64)
  s1 = np.asarray(seed1, np.int64).view(np.uint64)
  mixed = _philox((s0 & _MASK, s0 >> _SHIFT, s1 & _MASK, s1 >> _SHIFT),
                  _SCRAMBLE_KEY)
  zero = np.zeros_like(mixed[0])
  return (mixed[0], mixed[1]), (zero, zero, mixed[2], mixed[3])


def fold_in(seed0, seed1, data):
  """`tf.random.experimental.stateless_fold_in([seed0, seed1], data)`.

  Args:
    seed0, seed1: the int64 seed pair (scalars or [n]).
    data: int64 scalar or [n] (e.g. an epoch or an example position).

  Returns:
    The new seed pair, ([n] int64, [n] int64).
  """
  key, counter = _key_counter(seed0, seed1)
  u = _philox(counter, key)
  first = (u[0] | (u[1] << _SHIFT)).view(np.int64)
  data = np.asarray(data, np.int64)
  return np.broadcast_arrays(first, data)


def uniform(seed0, seed1, num: int) -> np.ndarray:
  """`tf.random.stateless_uniform([num], seed=[seed0, seed1])`, float32.

  Args:
    seed0, seed1: int64 seed pairs, [n] each (or scalars).
    num: values per seed.

  Returns:
    [n, num] float32 in [0, 1) ([num] for scalar seeds).
  """
  key, counter = _key_counter(seed0, seed1)
  words = []
  for block in range(-(-num // 4)):
    words.extend(_philox(_add_to_counter(counter, block), key))
  bits = np.stack(words[:num], -1)
  floats = ((bits & np.uint64(0x7FFFFF)) | np.uint64(0x3F800000)).astype(
      np.uint32).view(np.float32)
  return floats - np.float32(1.0)


def shuffle(num: int, seed0: int, seed1: int) -> np.ndarray:
  """`tf.random.experimental.stateless_shuffle(tf.range(num), seed)`.

  Args:
    num: permutation length (< 2**31, where TF uses 32-bit draws).
    seed0, seed1: the int64 seed pair.

  Returns:
    [num] int64, a permutation of range(num).
  """
  if num > _INT32_MAX:
    raise ValueError(f'shuffle of {num} > 2**31 - 1 elements')
  perm = list(range(num))
  if num < 2:
    return np.asarray(perm, np.int64)
  key, counter = _key_counter(seed0, seed1)
  blocks = np.arange(-(-(num - 1) // 4), dtype=np.uint64)
  words = _philox(_add_to_counter(counter, blocks), key)
  draws = np.stack(words, -1).reshape(-1)[:num - 1]
  # u_i % (n - i) as TF's uint32 modulo; the swaps stay sequential.
  offsets = (draws % np.arange(num, 1, -1, dtype=np.uint64)).tolist()
  for i, off in enumerate(offsets):
    j = i + off
    perm[i], perm[j] = perm[j], perm[i]
  return np.asarray(perm, np.int64)
