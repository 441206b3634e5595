"""The analytic backward of MultiHeadAttention and Softmax layers
(``blpa/keras/attention.py``): forward bit-identical to the layer, bits 0
gradients (variables and inputs) equal to plain Keras's with the same
dropout draws, bits 4/8 close, the report's kinds and reasons, ``fit`` and
mixed precision.

Every comparison starts from the same values of *all* ``model.variables``
(they hold the dropout's seed-generator states).
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from blpa.keras import attention, compress
from blpa.keras.report import rows
from tests import keras_helpers as kh

L = keras.layers
T, S, DIM, B = 6, 7, 8, 2


def _float_inputs(inputs):
  return [t for t in tf.nest.flatten(inputs) if t.dtype.is_floating]


def run_both(model, compressed, inputs, seed=1):
  """``[(outputs, gradients of variables then float inputs, seed states
  after)]`` of ``model`` and ``compressed`` from the same variables, for
  the loss ``sum(out * w)`` with fixed random ``w``."""
  start = [v.numpy() for v in model.variables]
  out_spec = model(inputs, training=False)
  w = tf.random.stateless_normal(out_spec.shape, [seed, 0])
  results = []
  for m in (model, compressed):
    for v, value in zip(model.variables, start):
      v.assign(value)

    @tf.function
    def step(inputs, m=m):
      with tf.GradientTape() as tape:
        floats = _float_inputs(inputs)
        tape.watch(floats)
        out = m(inputs, training=True)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * w)
      return out, tape.gradient(loss, model.trainable_variables + floats)

    out, grads = step(inputs)
    seeds = [v.numpy() for v in model.variables if 'seed' in v.path]
    results.append((np.asarray(tf.cast(out, tf.float32)),
                    [np.asarray(tf.cast(g, tf.float32)) for g in grads],
                    seeds))
  for v, value in zip(model.variables, start):
    v.assign(value)
  return results


def _x(shape, seed):
  return tf.random.stateless_normal(shape, [seed, 7])


def _model(case):
  """(model, inputs) of one configuration; every model computes its MHA
  inputs with layers (so that their gradients are checked too)."""
  q_in = keras.Input((T, DIM))
  q = L.LayerNormalization()(q_in)
  inputs, extra = [q_in], {}
  mha = dict(num_heads=2, key_dim=4)
  if case == 'self_dropout':
    out = L.MultiHeadAttention(dropout=0.2, **mha)(q, q)
  elif case == 'cross':
    v_in = keras.Input((S, DIM))
    inputs.append(v_in)
    out = L.MultiHeadAttention(dropout=0.1, **mha)(q, L.Dense(DIM)(v_in))
  elif case == 'key':
    v_in = keras.Input((S, DIM))
    inputs.append(v_in)
    v = L.Dense(DIM)(v_in)
    out = L.MultiHeadAttention(dropout=0.1, **mha)(q, v, key=L.Dense(5)(v))
  elif case == 'key_is_query':
    v_in = keras.Input((T, DIM))
    inputs.append(v_in)
    out = L.MultiHeadAttention(**mha)(q, L.Dense(DIM)(v_in), key=q)
  elif case == 'attention_mask':
    m_in = keras.Input((T, T), dtype='int32')
    inputs.append(m_in)
    out = L.MultiHeadAttention(dropout=0.2, **mha)(q, q, attention_mask=m_in)
    rng = np.random.default_rng(0)
    extra['mask'] = (rng.random((B, T, T)) > 0.4).astype('int32')
    extra['mask'][:, 0] = 0  # a fully masked row
  elif case == 'causal':
    out = L.MultiHeadAttention(dropout=0.2, **mha)(q, q, use_causal_mask=True)
  elif case == 'causal_no_dropout':
    out = L.MultiHeadAttention(**mha)(q, q, use_causal_mask=True)
  elif case == 'no_bias':
    out = L.MultiHeadAttention(dropout=0.2, use_bias=False, **mha)(q, q)
  elif case == 'value_dim':
    out = L.MultiHeadAttention(2, 4, value_dim=3, dropout=0.2)(q, q)
  else:
    raise ValueError(case)
  model = keras.Model(inputs, L.Dense(4)(out))
  values = [_x([B, T, DIM], 0)]
  for kt in inputs[1:]:
    if kt.dtype == 'int32':
      values.append(tf.constant(extra['mask']))
    else:
      values.append(_x([B] + list(kt.shape[1:]), len(values)))
  return model, values


CASES = ['self_dropout', 'cross', 'key', 'key_is_query', 'attention_mask',
         'causal', 'causal_no_dropout', 'no_bias', 'value_dim']


def _mha_steps(compressed):
  return [s for s in compressed.plan
          if isinstance(s.layer, L.MultiHeadAttention)]


@pytest.mark.parametrize('case', CASES)
def test_functional_bits0_equals_keras(case):
  """Bits 0: the analytic path's output is the layer's (bit for bit when
  dropout forces Keras's explicit path), its gradients (variables and
  inputs) Keras's, and the seed state ends where Keras leaves it."""
  model, inputs = _model(case)
  compressed = compress(model, 0)
  assert [s.kind for s in _mha_steps(compressed)] == ['mha']
  (o0, g0, s0), (o1, g1, s1) = run_both(model, compressed, inputs)
  if _mha_steps(compressed)[0].layer.dropout > 0:
    np.testing.assert_array_equal(o0, o1)
  else:  # Keras runs the fused ops.dot_product_attention
    np.testing.assert_allclose(o0, o1, rtol=1e-5, atol=1e-6)
  kh.assert_same_gradients(g0, g1)
  for a, b in zip(s0, s1):
    np.testing.assert_array_equal(a, b)


def test_forward_is_the_layers_bit_for_bit():
  """The MHA's own output (not through a head) equals the layer's."""
  inp = keras.Input((T, DIM))
  model = keras.Model(inp, L.MultiHeadAttention(2, 4, dropout=0.3)(inp, inp))
  x = _x([B, T, DIM], 3)
  start = [v.numpy() for v in model.variables]
  plain = model(x, training=True)
  for v, value in zip(model.variables, start):
    v.assign(value)
  ours = compress(model, 4)(x, training=True)
  np.testing.assert_array_equal(plain.numpy(), ours.numpy())


def _bits_figures(model, inputs, bits):
  compressed = compress(model, bits)
  (_, g0, _), (_, g1, _) = run_both(model, compressed, inputs)
  return kh.weighted_cosine(g0, g1), kh.global_rel_error(g0, g1)


def test_bits8_close_and_bits4_reported():
  """Bits 8: norm-weighted per-variable cosine >= 0.999 and whole-gradient
  relative error <= 3%; bits 4 figures printed (``-s``)."""
  model, inputs = _model('causal')
  cos8, err8 = _bits_figures(model, inputs, 8)
  cos4, err4 = _bits_figures(model, inputs, 4)
  print(f'\nMHA causal, dropout 0.2: bits 8 cosine {cos8:.6f} rel. error '
        f'{err8:.2e}; bits 4 cosine {cos4:.4f} rel. error {err4:.2e}')
  assert cos8 >= 0.999 and err8 <= 0.03
  assert cos4 >= 0.95


class _Block(L.Layer):
  """A custom pre-norm block calling its MHA with keyword arguments."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.norm = L.LayerNormalization()
    self.mha = L.MultiHeadAttention(2, 4, dropout=0.2)
    self.out = L.Dense(DIM)

  def call(self, x, training=None):
    h = self.norm(x)
    h = self.mha(query=h, value=h, training=training)
    return x + self.out(h)


class _Subclassed(keras.Model):

  def __init__(self):
    super().__init__(name='subclassed')
    self.block = _Block(name="block")
    self.head = L.Dense(4)

  def call(self, x, training=None):
    return self.head(self.block(x, training=training))


def _hub_model():
  keras_hub = pytest.importorskip('keras_hub')
  inp = keras.Input((T, DIM))
  h = keras_hub.layers.TransformerEncoder(intermediate_dim=16, num_heads=2,
                                          dropout=0.1)(inp)
  return keras.Model(inp, L.Dense(4)(h))


@pytest.mark.parametrize('which', ['subclassed', 'keras_hub'])
def test_leaves_bits0_equals_keras(which):
  """A subclassed model with a custom block, and keras-hub's
  TransformerEncoder in a functional model: the MHA leaf takes the analytic
  path (the report says 'mha') with Keras's gradients at bits 0."""
  model = _Subclassed() if which == 'subclassed' else _hub_model()
  x = _x([B, T, DIM], 0)
  model(x)
  compressed = compress(model, 0)
  (o0, g0, s0), (o1, g1, s1) = run_both(model, compressed, x)
  np.testing.assert_array_equal(o0, o1)
  kh.assert_same_gradients(g0, g1)
  for a, b in zip(s0, s1):
    np.testing.assert_array_equal(a, b)
  kinds = {r['layer'].split('/')[-1]: r['kind']
           for r in rows(compressed, 2, inputs=x)}
  mha = [k for name, k in kinds.items()
         if name.startswith('multi_head_attention') or
         name == 'self_attention_layer']
  assert mha == ['mha'], kinds


def test_report_lists_mha_and_refusal_keeps_correct_gradients():
  """The report lists the MHA node as 'mha' with its bytes; a call with
  ``return_attention_scores`` is refused with its reason (the generic
  path), and its gradients are still Keras's."""
  model, inputs = _model('self_dropout')
  table = rows(compress(model, 4), B)
  (row,) = [r for r in table if r['kind'] == 'mha']
  rows_of_p = B * 2 * T
  # 4-bit codes (4 bytes per position, 8 channels) of Qs, K, V and A; per
  # row of P, T 4-bit codes and its float32 maximum; the dropout mask, a
  # bit per probability. (Its input's copy is the LayerNormalization's
  # output codes, counted on that row.)
  assert row['bytes'] == 4 * B * T * 4 + rows_of_p * (T // 2 + 4) + \
      rows_of_p * T // 8
  inp = keras.Input((T, DIM))
  h = L.LayerNormalization()(inp)
  a, scores = L.MultiHeadAttention(2, 4, dropout=0.2)(
      h, h, return_attention_scores=True)
  out = L.Dense(4)(a) + keras.ops.mean(scores, axis=1)[..., :4]
  refused = keras.Model(inp, out)
  compressed = compress(refused, 0)
  (step,) = _mha_steps(compressed)
  assert step.kind == 'generic'
  assert step.reason == 'return_attention_scores=True'
  (_, g0, _), (_, g1, _) = run_both(refused, compressed, inputs[0])
  kh.assert_same_gradients(g0, g1)


def test_fit_at_bits4():
  """``fit`` of a tiny MHA classifier at bits 4 runs and lowers the loss."""
  inp = keras.Input((T, DIM))
  h = L.MultiHeadAttention(2, 4, dropout=0.1)(inp, inp)
  model = keras.Model(inp, L.Dense(3)(L.GlobalAveragePooling1D()(h)))
  compressed = compress(model, 4)
  compressed.compile(keras.optimizers.Adam(1e-2),
                     keras.losses.SparseCategoricalCrossentropy(True))
  x = np.asarray(_x([32, T, DIM], 5))
  y = (x[:, 0, 0] > 0).astype('int32')
  history = compressed.fit(x, y, batch_size=8, epochs=4, verbose=0)
  losses = history.history['loss']
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.fixture
def bfloat16_policy():
  keras.config.set_dtype_policy('mixed_bfloat16')
  try:
    yield
  finally:
    keras.config.set_dtype_policy('float32')


def test_mixed_bfloat16_bits0_close_to_keras(bfloat16_policy):  # pylint: disable=redefined-outer-name,unused-argument
  """Under mixed_bfloat16 the MHA computes in bfloat16: bits 0 gradients
  within bfloat16 rounding of Keras's, each in its variable's dtype."""
  model, inputs = _model('self_dropout')
  compressed = compress(model, 0)
  (step,) = _mha_steps(compressed)
  assert step.kind == 'mha' and step.layer.compute_dtype == 'bfloat16'
  (o0, g0, _), (o1, g1, _) = run_both(model, compressed, inputs)
  np.testing.assert_array_equal(o0, o1)
  # The key projection's bias has an exact gradient of zero (a softmax is
  # unchanged by a shift of its row): both figures there are bfloat16
  # rounding noise, so it is left out of the cosine.
  paths = [v.path for v in model.trainable_variables]
  keep = [i for i in range(len(g0))
          if i >= len(paths) or not paths[i].endswith('key/bias')]
  assert len(keep) == len(g0) - 1
  assert kh.weighted_cosine([g0[i] for i in keep],
                            [g1[i] for i in keep]) >= 0.9999
  assert kh.global_rel_error(g0, g1) <= 2e-2


# ------------------------------------------------------------ Softmax


@pytest.mark.parametrize('layer', ['softmax', 'activation'])
def test_softmax_layer(layer):
  """A Softmax layer (or Activation('softmax')) keeps the row codes of its
  output: bits 0 equals Keras (as a hidden layer, and as the head whose
  logits Keras's crossentropy reads), bits 8 is close."""
  inp = keras.Input((T, DIM))
  act = L.Softmax() if layer == 'softmax' else L.Activation('softmax')
  h = L.Dense(DIM)(act(L.Dense(DIM)(inp)))
  head = L.Softmax() if layer == 'softmax' else L.Activation('softmax')
  model = keras.Model(inp, head(L.Dense(5)(L.GlobalAveragePooling1D()(h))))
  compressed = compress(model, 0)
  assert [s.kind for s in compressed.plan].count('softmax') == 2
  x, y = kh.batch([4, T, DIM], classes=5)
  (_, g0, _), (_, g1, _) = kh.compare(model, compressed, x, y,
                                      from_logits=False)
  kh.assert_same_gradients(g0, g1)
  (_, g0, _), (_, g8, _) = kh.compare(model, compress(model, 8), x, y,
                                      from_logits=False)
  assert kh.weighted_cosine(g0, g8) >= 0.999


def test_softmax_refuses_a_mask():
  """A Softmax called with a mask keeps the generic path, with a reason."""
  inp = keras.Input((T, DIM))
  m_in = keras.Input((T, DIM), dtype='bool')
  model = keras.Model([inp, m_in], L.Softmax()(inp, mask=m_in))
  (step,) = [s for s in compress(model, 4).plan if s.kind != 'ordinary' or
             isinstance(s.layer, L.Softmax)]
  assert step.kind != 'softmax'
  assert attention.softmax_reason(
      step.layer, step.node.arguments.kwargs, step.node.input_tensors) == \
      'masked softmax'


# ------------------------------------------------------------ RowCodes


@pytest.mark.parametrize('bits', [4, 8])
def test_row_codes_keep_zeros_and_half_a_bin(bits):
  """Probabilities restore within half a bin of ``rowmax / (2**bits - 1)``;
  exact zeros (masked positions, an all-zero row) restore to 0."""
  logits = tf.random.stateless_normal([3, 2, 5, 11], [0, 1]) * 3
  p = tf.nn.softmax(logits).numpy()
  p[..., 3] = 0.0
  p[0, 0, 0] = 0.0
  codec = attention.RowCodes(tf.constant(p), bits)
  got = codec.restore().numpy()
  rowmax = p.max(-1, keepdims=True)
  half = rowmax / (2**bits - 1) / 2
  assert np.all(np.abs(got - p) <= half * (1 + 1e-4))  # the 1e-6 epsilon
  assert np.all(got[p == 0] == 0)
  assert got.dtype == np.float32 and got.shape == p.shape
