"""LayerNormalization, RMSNormalization, EinsumDense and smooth activations
(GELU, SiLU, tanh, sigmoid, ...) with analytic backward passes in
``blpa.keras.compress``: forward bit-identical to Keras, bits 0 gradients
equal to Keras's (variables and inputs), bits 8/4 close; the LayerNorm's
codes are shared with the layers that read its output; refused cases keep
correct gradients."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from blpa.keras import activations, compress, einsum, kept_bytes, norm
from blpa.keras.report import report, rows
from tests import keras_helpers as kh

keras_hub = pytest.importorskip('keras_hub')
gelu_approximate = keras_hub.src.utils.keras_utils.gelu_approximate

L = keras.layers
SEQ, DIM, BATCH = 6, 8, 4


def _layers():
  """The layers of :func:`functional_model` / :class:`Subclassed`."""
  return [
      L.LayerNormalization(name='ln'),
      L.Dense(2 * DIM, activation='gelu', name='ff_gelu'),
      L.EinsumDense('abc,cd->abd', output_shape=(None, DIM), bias_axes='d',
                    activation='silu', name='ein_silu'),
      L.Activation('tanh', name='act_tanh'),
      L.RMSNormalization(name='rms'),
      L.EinsumDense('abc,cde->abde', output_shape=(None, 2, DIM // 2),
                    bias_axes='de', activation=gelu_approximate,
                    name='ein_heads'),
      L.Reshape((SEQ, DIM), name='merge'),
      L.LayerNormalization(rms_scaling=True, center=False, name='ln_rms'),
      L.Activation('sigmoid', name='act_sigmoid'),
      L.EinsumDense('abc,cd->abd', output_shape=(SEQ, DIM), bias_axes='bd',
                    name='ein_bias_bd'),
      L.LayerNormalization(scale=False, name='ln_noscale'),
      L.GlobalAveragePooling1D(name='gap'),
      L.Dense(10, name='head'),
  ]


def functional_model():
  inp = keras.Input((SEQ, DIM))
  h = inp
  for layer in _layers():
    h = layer(h)
  return keras.Model(inp, h, name='norms')


class Subclassed(keras.Model):
  """The same layers, called from Python."""

  def __init__(self):
    super().__init__(name='norms_sub')
    self.stack = _layers()

  def call(self, x):
    for layer in self.stack:
      x = layer(x)
    return x


def grads_of(model, x, y):
  """Outputs and gradients of mean cross-entropy w.r.t. the trainable
  variables and the input (in tf.function)."""
  @tf.function
  def step(x, y):
    with tf.GradientTape() as tape:
      tape.watch(x)
      out = model(x, training=True)
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, out, from_logits=True))
    return out, tape.gradient(loss, model.trainable_variables + [x])
  out, grads = step(x, y)
  return out.numpy(), [tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.fixture(scope='module', params=['functional', 'subclassed'])
def built(request):
  keras.utils.set_random_seed(3)
  model = functional_model() if request.param == 'functional' else \
      Subclassed()
  x, y = kh.batch([BATCH, SEQ, DIM], seed=3)
  model(x)
  ref = grads_of(model, x, y)
  return model, x, y, ref


def test_forward_bit_identical_and_bits0_equals_keras(built):
  model, x, y, (out, ref) = built
  out0, got = grads_of(compress(model, 0), x, y)
  out4, _ = grads_of(compress(model, 4), x, y)
  assert np.array_equal(out, out0) and np.array_equal(out, out4)
  assert kh.global_rel_error(ref, got) <= 1e-5
  assert max(kh.rel_errors(ref, got)) <= 1e-5  # inputs' gradient included


# Measured (both models, 2026-12-06): weighted cosine 0.999986 at bits 8,
# 0.996945 at bits 4; relative error 0.0040 and 0.0544.
@pytest.mark.parametrize('bits,bound,rel', [(8, 0.999, 0.01),
                                            (4, 0.99, 0.08)])
def test_quantized_gradients_close(built, bits, bound, rel):
  model, x, y, (_, ref) = built
  _, got = grads_of(compress(model, bits), x, y)
  cosine = kh.weighted_cosine(ref, got)
  err = kh.global_rel_error(ref, got)
  print(f'{model.name} bits {bits}: weighted cosine {cosine:.6f}, '
        f'relative error {err:.4f}')
  assert cosine >= bound and err <= rel


def test_kinds_and_acts_in_the_report(built):
  model, x, _, _ = built
  kinds = {r['layer'].split('/')[-1]: r['kind']
           for r in rows(compress(model, 4), BATCH, inputs=x)}
  assert kinds['ln'] == kinds['ln_rms'] == kinds['ln_noscale'] == 'layernorm'
  assert kinds['rms'] == 'rmsnorm'
  assert kinds['ff_gelu'] == 'dense+gelu'
  assert kinds['ein_silu'] == 'einsum_dense+silu'
  assert kinds['ein_heads'] == 'einsum_dense+gelu_tanh'
  assert kinds['ein_bias_bd'] == 'einsum_dense'
  assert kinds['act_tanh'] == kinds['act_sigmoid'] == 'smooth_act'


def _ln_dense_model():
  inp = keras.Input((SEQ, DIM))
  h = L.LayerNormalization(name='ln')(inp)
  h = L.Dense(DIM, name='proj')(h)
  return keras.Model(inp, h)


class LnDense(keras.Model):

  def __init__(self):
    super().__init__()
    self.ln, self.proj = L.LayerNormalization(), L.Dense(DIM)

  def call(self, x):
    return self.proj(self.ln(x))


@pytest.mark.parametrize('make', [_ln_dense_model, LnDense],
                         ids=['functional', 'subclassed'])
def test_dense_after_layernorm_shares_its_codes(make):
  """The Dense reading the LayerNorm's output keeps no copy of its own:
  what the step keeps is the LN's codes and statistics only."""
  model = make()
  x = tf.zeros([BATCH, SEQ, DIM])
  model(x)
  compressed = compress(model, 4)
  table = rows(compressed, BATCH, inputs=x)
  proj = [r for r in table if r['kind'] == 'dense']
  assert len(proj) == 1 and proj[0]['bytes'] == 0, table
  kept = kept_bytes(compressed, BATCH, inputs=x)
  codes = BATCH * SEQ * DIM // 2  # 4 bits per value
  assert kept['by_dtype'].get('uint8', 0) == codes, kept
  assert sum(r['bytes'] for r in table) == codes + 4 * BATCH * SEQ


def test_mixed_bfloat16_bits0_close_to_keras():
  keras.config.set_dtype_policy('mixed_bfloat16')
  try:
    keras.utils.set_random_seed(4)
    model = functional_model()
  finally:
    keras.config.set_dtype_policy('float32')
  x, y = kh.batch([BATCH, SEQ, DIM], seed=4)
  out, ref = grads_of(model, x, y)
  out0, got = grads_of(compress(model, 0), x, y)
  assert np.array_equal(out, out0)
  err = kh.global_rel_error(ref, got)
  print(f'mixed_bfloat16 bits 0: relative error {err:.2e}')
  assert err <= 2e-2


def test_sigmoid_head_keeps_its_logits():
  """Dense(1, sigmoid) under binary cross-entropy (from_logits=False):
  Keras differentiates the logits the output carries; so does the
  compressed model (bits 0 equals Keras)."""
  keras.utils.set_random_seed(5)
  inp = keras.Input((DIM,))
  model = keras.Model(inp, L.Dense(1, activation='sigmoid')(
      L.Dense(DIM, activation='tanh')(inp)))
  head = model.layers[-1]
  head.kernel.assign(head.kernel * 100.0)  # saturated: p clipped to 1e-7
  x = tf.constant(np.random.default_rng(5).normal(size=[BATCH, DIM]),
                  tf.float32)
  y = tf.constant([[0.0], [1.0], [0.0], [1.0]])

  def grads(m):
    with tf.GradientTape() as tape:
      loss = keras.losses.binary_crossentropy(y, m(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]

  kh.assert_same_gradients(grads(model), grads(compress(model, 0)))


@pytest.mark.parametrize('layer,why', [
    (L.EinsumDense('...b,bc->...c', output_shape=DIM, bias_axes='c'),
     "'...'"),
    (L.EinsumDense('abc,cd->ad', output_shape=DIM), "index 'b' summed"),
    (L.LayerNormalization(axis=1), 'not the last alone'),
    (L.Dense(DIM, activation='softsign'), 'known smooth one'),
    (L.Activation(lambda t: t * tf.sigmoid(t)), 'no analytic backward'),
])
def test_refused_cases_give_a_reason_and_keras_gradients(layer, why):
  keras.utils.set_random_seed(6)
  inp = keras.Input((SEQ, DIM))
  h = L.GlobalAveragePooling1D()(L.Reshape((-1, DIM))(layer(inp)))
  model = keras.Model(inp, L.Dense(10)(h))
  x, y = kh.batch([BATCH, SEQ, DIM], seed=6)
  step, = [s for s in compress(model, 0).plan if s.layer is layer]
  assert step.kind == 'generic' and why in step.reason, step
  (_, ref, _), (_, got, _) = kh.compare(model, compress(model, 0), x, y)
  kh.assert_same_gradients(ref, got)


@pytest.mark.parametrize('equation,x_shape,w_shape', [
    ('ab,bc->ac', [3, 4], [4, 5]),
    ('abc,cd->abd', [2, 3, 4], [4, 5]),
    ('abc,cde->abde', [2, 3, 4], [4, 2, 3]),
    ('abcd,cde->abe', [2, 3, 4, 5], [4, 5, 6]),
    ('abc,bcd->abd', [2, 3, 4], [3, 4, 5]),
])
def test_einsum_grads_equal_autodiff(equation, x_shape, w_shape):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(size=x_shape), tf.float32)
  w = tf.constant(rng.normal(size=w_shape), tf.float32)
  with tf.GradientTape(persistent=True) as tape:
    tape.watch([x, w])
    out = tf.einsum(equation, x, w)
  dy = tf.constant(rng.normal(size=out.shape), tf.float32)
  ref = tape.gradient(out, [x, w], output_gradients=dy)
  got = einsum.grads(equation, x, w, dy)
  for a, b in zip(ref, got):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
  assert einsum.grads(equation, None, w, dy)[1] is None


def test_einsum_bias_grad_equals_autodiff():
  rng = np.random.default_rng(1)
  dy = tf.constant(rng.normal(size=[2, 3, 4, 5]), tf.float32)
  for shape in ([5], [4, 5], [3, 1, 5], [3, 4, 1]):
    b = tf.zeros(shape)
    with tf.GradientTape() as tape:
      tape.watch(b)
      out = tf.zeros([2, 3, 4, 5]) + b
    ref = tape.gradient(out, b, output_gradients=dy)
    np.testing.assert_allclose(einsum.bias_grad(dy, shape).numpy(),
                               ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fn', [
    keras.activations.gelu, gelu_approximate, keras.activations.silu,
    keras.activations.tanh, keras.activations.sigmoid,
    keras.activations.elu, keras.activations.softplus])
def test_derivative_equals_autodiff(fn):
  z = tf.constant(np.linspace(-6, 6, 241), tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(z)
    out = fn(z)
  ref = tape.gradient(out, z)
  got = activations.derivative(activations.name_of(fn), z)
  np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_name_of_recognizes_only_known_functions():
  assert activations.name_of(keras.activations.swish) == 'silu'
  assert activations.name_of(gelu_approximate) == 'gelu_tanh'
  assert activations.name_of(keras.activations.softsign) is None
  assert activations.name_of(lambda t: t) is None

  def gelu(t):  # a user function named like Keras's: not recognized
    return t
  assert activations.name_of(gelu) is None


def test_norm_code_ranges_both_work():
  """Both code ranges restore the normalized values to within their bins."""
  keras.utils.set_random_seed(8)
  layer = L.LayerNormalization()
  x = tf.random.normal([BATCH, SEQ, DIM]) * 3 + 1
  out = layer(x)
  y = norm.statistics(layer, 'layernorm', x)[0]
  for code_range in norm.RANGES:
    for bits, tol in ((4, 0.21), (8, 0.02)):
      copy = norm.NormCopy(layer, 'layernorm', bits, x, out, code_range)
      err = float(tf.reduce_max(tf.abs(copy.normalized()[0] - y)))
      assert err <= tol, (code_range, bits, err)


def test_embedding_is_compact_in_the_report():
  inp = keras.Input((SEQ,), dtype='int32')
  h = L.Embedding(50, DIM, name='emb')(inp)
  model = keras.Model(inp, L.Dense(10)(L.GlobalAveragePooling1D()(h)))
  table = rows(compress(model, 4), BATCH)
  row, = [r for r in table if r['layer'] == 'emb']
  assert row['kind'] == 'embedding' and 'indices only' in row['keeps']
  assert 'embedding' in report(compress(model, 4), BATCH)


def _encoder():
  inp = keras.Input((SEQ, 2 * DIM))
  h = keras_hub.layers.TransformerEncoder(
      intermediate_dim=32, num_heads=2, activation='gelu', name='enc')(inp)
  h = L.GlobalAveragePooling1D()(h)
  return keras.Model(inp, L.Dense(10)(h)), kh.batch([BATCH, SEQ, 2 * DIM])


def _vit():
  backbone = keras_hub.models.ViTBackbone(
      image_shape=(16, 16, 3), patch_size=4, num_layers=1, num_heads=2,
      hidden_dim=DIM, mlp_dim=2 * DIM)
  model = keras.Model(backbone.input, L.Dense(10)(backbone.output[:, 0]))
  return model, kh.batch([BATCH, 16, 16, 3])


@pytest.mark.parametrize('make,leaves', [
    (_encoder, {'enc/self_attention_layer_norm': 'layernorm',
                'enc/feedforward_intermediate_dense': 'dense+gelu'}),
    (_vit, {'transformer_block_1/ln_1': 'layernorm',
            'transformer_block_1/mlp/dense_1': 'dense+gelu'}),
], ids=['transformer_encoder', 'vit'])
def test_keras_hub_bits0_equals_keras(make, leaves):
  keras.utils.set_random_seed(9)
  model, (x, y) = make()
  o0, ref = grads_of(model, x, y)
  o1, got = grads_of(compress(model, 0), x, y)
  # (MultiHeadAttention's own wrapper may round differently: not bit-equal)
  np.testing.assert_allclose(o0, o1, rtol=1e-5, atol=1e-6)
  kh.assert_same_gradients(ref, got)  # the input's gradient included
  table = {r['layer']: r['kind']
           for r in rows(compress(model, 4), BATCH, inputs=x)}
  for leaf, kind in leaves.items():
    found = [k for name, k in table.items() if name.endswith(leaf)]
    assert found == [kind], (leaf, table)
