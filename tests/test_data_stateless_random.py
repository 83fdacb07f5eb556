"""The numpy stateless draws equal TensorFlow's own ops, bit for bit.

The train stream (ae_jax.data.pipeline) was defined by TF's stateless
ops; the input workers compute the same numbers without TF.
"""

import numpy as np
import pytest
import tensorflow as tf

from ae_jax.data import stateless_random

SEEDS = [(0, 0), (7, 0x5EED), (7, 0xA06), (-3, 2**40 + 5), (2**62, -1)]


def _tf_fold_in(seed, data):
  return tf.random.experimental.stateless_fold_in(
      tf.constant(seed, tf.int64), tf.constant(data, tf.int64)).numpy()


@pytest.mark.parametrize('seed', SEEDS)
def test_fold_in_and_uniform_equal_tf(seed):
  data = np.array([0, 1, 2, 99, 12345, 2**40 + 3, -7], np.int64)
  got0, got1 = stateless_random.fold_in(seed[0], seed[1], data)
  got = stateless_random.uniform(got0, got1, 5)
  assert got.shape == (len(data), 5) and got.dtype == np.float32
  for i, d in enumerate(data):
    want_seed = _tf_fold_in(seed, d)
    assert (got0[i], got1[i]) == tuple(want_seed)
    for num in (1, 4, 5, 9):
      want = tf.random.stateless_uniform([num], seed=want_seed).numpy()
      np.testing.assert_array_equal(
          stateless_random.uniform(got0[i], got1[i], num), want)
    np.testing.assert_array_equal(
        got[i], tf.random.stateless_uniform([5], seed=want_seed).numpy())


@pytest.mark.parametrize('num', [0, 1, 2, 3, 5, 8, 9, 1000, 4099])
def test_shuffle_equals_tf(num):
  for epoch in (0, 1, 6):
    seed = _tf_fold_in((7, 0x5EED), epoch)
    want = tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), seed=seed).numpy()
    got = stateless_random.shuffle(num, *seed)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
  assert sorted(got.tolist()) == list(range(num))
