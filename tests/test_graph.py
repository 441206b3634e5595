"""blpa.graph: exact gradients, accumulation, API and errors."""

import numpy as np
import pytest
import tensorflow as tf

from blpa import autodiff, graph, models
from blpa.layers import NLDef
from tests import helpers

STEM = NLDef(False, False, False, None, False)
BODY = NLDef(True, True, False, None, False)
FINAL = NLDef(True, True, True, None, True)


def _relative_errors(got, want):
  return [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, want)]


def _tape_gradients(net, x, y, dtype):
  """GradientTape gradients of the same network in ordinary TF ops."""
  weights = [tf.cast(w, dtype) for w in net.weights]
  grads = autodiff.gradients(net.layers, weights, tf.constant(x, dtype),
                             tf.constant(y.reshape(-1)), net.weight_decay)
  return [g.numpy() for g in grads]


@pytest.mark.parametrize('name,specs,shape', [
    ('every kind', helpers.every_kind_specs(), [6, 16, 16, 3]),
    ('golden resnet11', helpers.golden_specs(), [4, 32, 32, 3]),
])
def test_exact_gradients_match_gradient_tape(name, specs, shape):
  """qtype 0 gradients equal autodiff's, through every layer kind.

  The reference is GradientTape in float64, so that the comparison measures
  blpa's error rather than float32 rounding; blpa must be within 1e-5
  relative error, or no worse than TF's own float32 autodiff (bias
  gradients are sums with much cancellation).
  """
  net = helpers.build(specs, shape, qtype=0)
  x, y = helpers.batch(shape, net.num_classes, seed=1)
  # Move the weights off their initial values (scale 1, bias 0).
  for w in net.weights[:-1]:
    if w.shape.rank == 1:
      w.assign(w + tf.random.uniform(w.shape, -0.3, 0.3))
  exact = _tape_gradients(net, x, y, tf.float64)
  tape = _relative_errors(_tape_gradients(net, x, y, tf.float32), exact)
  ours = _relative_errors(net.gradients(x, y), exact)
  for i, (err, tape_err) in enumerate(zip(ours, tape)):
    assert err <= max(1e-5, 2 * tape_err), (
        f'{name}: {net.weight_names[i]} gradient relative error {err:.3g} '
        f'(float32 GradientTape: {tape_err:.3g})')


@pytest.mark.parametrize('qtype,min_cosine,max_error', [(8, 0.98, 0.25),
                                                       (4, 0.9, 0.5)])
def test_quantized_gradients_close_to_exact(qtype, min_cosine, max_error):
  """Every layer's K-bit gradient points the same way as the exact one and
  has its size: cosine, relative error and norm ratio are bounded (the
  cosine alone would pass a gradient off by a constant factor).

  On this tiny network (batch 8, few channels) clipping at ±3 normalized
  units costs more than the bin width; bench/ measures ResNet-164.
  Measured (seed 2): relative error at most 0.15 (8 bits) and 0.38 (4 bits),
  norm ratios within 0.95-1.04; the bounds leave a margin.
  """
  specs, shape = helpers.every_kind_specs(), [8, 16, 16, 3]
  exact = helpers.build(specs, shape, qtype=0)
  approx = helpers.build(specs, shape, qtype=qtype)
  for a, b in zip(approx.weights, exact.weights):
    a.assign(b)
  x, y = helpers.batch(shape, exact.num_classes, seed=2)
  for g, w, name in zip(approx.gradients(x, y), exact.gradients(x, y),
                        exact.weight_names):
    cosine = np.sum(g * w) / (np.linalg.norm(g) * np.linalg.norm(w))
    error = np.linalg.norm(g - w) / np.linalg.norm(w)
    ratio = np.linalg.norm(g) / np.linalg.norm(w)
    assert cosine >= min_cosine, f'{name}: cosine {cosine:.4f}'
    assert error <= max_error, f'{name}: relative error {error:.4f}'
    assert abs(ratio - 1) <= 0.1, f'{name}: norm ratio {ratio:.4f}'


def test_quantized_layers_are_bn_relu_and_not_last_or_maxpool():
  net = helpers.build(helpers.every_kind_specs(), [2, 16, 16, 3], qtype=4)
  bits = [layer.bits for layer in net.layers]
  assert bits == [0, 0, 4, 4, 4, 4, 4, 0]
  saved = net.saved_bytes()
  # Layer 2 keeps 4-bit codes of 8 channels at 8x8: 4 bytes per pixel.
  assert saved[2] == (2, 4, 2 * 8 * 8 * 4 + 2 * 4 * 8)


@pytest.mark.parametrize('qtype', [0, 4])
def test_multi_accumulation_equals_mean_of_gradients(qtype):
  specs, shape = helpers.every_kind_specs(), [4, 16, 16, 3]
  single = helpers.build(specs, shape, qtype=qtype)
  multi = helpers.build(specs, shape, qtype=qtype, multi=3)
  for a, b in zip(multi.weights, single.weights):
    a.assign(b)
  batches = [helpers.batch(shape, single.num_classes, seed=s)
             for s in range(3)]
  mean = [sum(gs) / 3 for gs in zip(*[single.gradients(*b) for b in batches])]
  multi.binit()
  for x, y in batches:
    multi.forward(x, y)
    multi.hback()
  before = [w.numpy() for w in multi.weights]
  multi.cback(0.1)
  for w, b, g, name in zip(multi.weights, before, mean, multi.weight_names):
    np.testing.assert_allclose(w.numpy(), b - 0.1 * g, rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_momentum_has_tf1_semantics():
  specs, shape = helpers.every_kind_specs(), [4, 16, 16, 3]
  net = helpers.build(specs, shape)
  x, y = helpers.batch(shape, net.num_classes)
  w0 = [w.numpy() for w in net.weights]
  g1 = net.gradients(x, y)
  net.forward(x, y)
  net.backward(0.1)
  g2 = net.gradients(x, y)
  net.forward(x, y)
  net.backward(0.5)
  for w, a, b, c in zip(net.weights, w0, g1, g2):
    want = a - 0.1 * b - 0.5 * (0.9 * b + c)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-4, atol=1e-6)


def test_all_layers_train_including_first():
  net = helpers.build(helpers.every_kind_specs(), [4, 16, 16, 3])
  before = [w.numpy() for w in net.weights]
  x, y = helpers.batch([4, 16, 16, 3], net.num_classes)
  net.forward(x, y)
  net.backward(0.1)
  for w, b, name in zip(net.weights, before, net.weight_names):
    assert not np.array_equal(w.numpy(), b), f'{name} did not change'


def test_forward_modes_and_predictions():
  shape = [8, 16, 16, 3]
  net = helpers.build(helpers.every_kind_specs(), shape)
  x, y = helpers.batch(shape, net.num_classes)
  for _ in range(3):
    net.forward(x, y)
    net.backward(0.05)
  probs = net.forward(x)
  assert probs.shape == (8, net.num_classes)
  np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
  acc, loss = net.forward(x, y, train=False)
  np.testing.assert_allclose(loss, -np.mean(
      np.log(probs[np.arange(8), y.reshape(-1)])), rtol=1e-4)
  # Running statistics make per-example results independent of the batch.
  one = net.forward(x[:1], bn='running')
  np.testing.assert_allclose(one[0], net.forward(x, bn='running')[0],
                             rtol=1e-4, atol=1e-6)
  # Evaluation stores nothing: backward after it is refused.
  with pytest.raises(ValueError, match='call forward'):
    net.backward(0.1)
  assert 0 <= acc <= 1


def test_checkpoint_round_trip_with_state(tmp_path):
  shape = [4, 16, 16, 3]
  net = helpers.build(helpers.every_kind_specs(), shape)
  x, y = helpers.batch(shape, net.num_classes)
  net.forward(x, y)
  net.backward(0.1)
  path = str(tmp_path / 'ckpt.npz')
  net.save(path, 7, state=True)
  other = helpers.build(helpers.every_kind_specs(), shape)
  assert other.load(path) == 7
  for a, b in zip(net.weights + net.momentum, other.weights + other.momentum):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  for step in range(2):
    net.forward(x, y)
    net.backward(0.1)
    other.forward(x, y)
    other.backward(0.1)
  for a, b in zip(net.weights, other.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not [f for f in tmp_path.iterdir() if f.name != 'ckpt.npz']


def test_checkpoint_errors(tmp_path):
  net = helpers.build(helpers.every_kind_specs(), [2, 16, 16, 3])
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    net.load(str(tmp_path / 'missing.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not a readable'):
    net.load(str(tmp_path / 'junk.npz'))
  golden = helpers.build(helpers.golden_specs(), [2, 32, 32, 3])
  golden.save(str(tmp_path / 'other.npz'), 0)
  with pytest.raises(ValueError, match='different network'):
    net.load(str(tmp_path / 'other.npz'))
  wider = helpers.every_kind_specs()
  wider[0] = (3, 10, 1, 'SAME', STEM)
  helpers.build(wider, [2, 16, 16, 3]).save(str(tmp_path / 'wide.npz'), 0)
  with pytest.raises(ValueError, match=r'weight 0 \(layer 0 kernel\)'):
    net.load(str(tmp_path / 'wide.npz'))


# ---------------------------------------------------------------------------
# Spec errors at add / close
# ---------------------------------------------------------------------------


def _graph(shape=(2, 16, 16, 3)):
  net = graph.Graph(graph.SimpleData(list(shape)), graph.LogLoss())
  net.add(3, 8, 1, 'SAME', STEM)
  return net


@pytest.mark.parametrize('spec,match', [
    ((3, 8, 1, 'SAME', NLDef(True, True, False, None, True)),
     r'layer 1 .*avpool needs ksz == 1'),
    ((1, 8, 1, 'SAME', NLDef(True, True, True, None, False)),
     r'layer 1 .*no residual is pending'),
    ((1, 8, 1, 'FULL', BODY), r"layer 1 .*pad must be one of"),
    ((0, 8, 1, 'SAME', BODY), r'layer 1 .*ksz must be a positive integer'),
    ((1, 8, 1, 'SAME', [True, True, False, None, False]),
     r'layer 1 .*must be an NLDef'),
    ((20, 8, 1, 'VALID', BODY), r'layer 1 .*VALID 20x20 convolution'),
])
def test_bad_layer_spec_names_layer_and_problem(spec, match):
  net = _graph()
  with pytest.raises(ValueError, match=match):
    net.add(*spec)


def test_residual_that_cannot_be_joined():
  net = _graph()
  net.add(1, 16, 1, 'SAME', NLDef(True, True, False, 2, False))
  net.add(3, 5, 1, 'SAME', BODY)   # 16x16x5: fewer channels than the buffer
  with pytest.raises(ValueError, match=r'layer 3 .*residual from layer 1 .*'
                     r'pad channels'):
    net.add(1, 8, 1, 'SAME', NLDef(True, True, True, 1, False))
  net = _graph((2, 15, 15, 3))
  net.add(1, 8, 1, 'SAME', NLDef(True, True, False, 2, False))
  net.add(3, 8, 2, 'SAME', BODY)   # 15 -> 8: not an integer factor
  with pytest.raises(ValueError, match=r'layer 3 .*same integer factor'):
    net.add(1, 8, 1, 'SAME', NLDef(True, True, True, 1, False))
  net = _graph()
  net.add(1, 8, 1, 'SAME', NLDef(True, True, False, 2, False))
  with pytest.raises(ValueError, match=r'layer 2 .*still pending'):
    net.add(1, 8, 1, 'SAME', NLDef(True, True, False, 1, False))


@pytest.mark.parametrize('kwargs,match', [
    ({'qtype': 2}, 'qtype must be 0, 4 or 8'),
    ({'qtype': True}, 'qtype must be 0, 4 or 8'),
    ({'WD': -1.0}, 'WD must be a number'),
    ({'multi': 0}, 'multi must be False or an integer'),
])
def test_bad_close_arguments(kwargs, match):
  net = _graph()
  net.add(1, 4, 1, 'VALID', NLDef(True, True, False, None, True))
  with pytest.raises(ValueError, match=match):
    net.close(**kwargs)


def test_close_checks_network():
  with pytest.raises(ValueError, match='no layers'):
    graph.Graph(graph.SimpleData([2, 8, 8, 3]), graph.LogLoss()).close()
  net = _graph()
  net.add(1, 4, 1, 'SAME', BODY)
  with pytest.raises(ValueError, match='outputs 16x16 but LogLoss needs 1x1'):
    net.close()
  net = _graph()
  net.add(1, 4, 1, 'SAME', NLDef(True, True, False, 2, False))
  net.add(1, 4, 1, 'VALID', NLDef(True, True, False, None, True))
  with pytest.raises(ValueError, match='residual from layer 1 is never'):
    net.close()


def test_bad_forward_inputs():
  shape = [2, 16, 16, 3]
  net = helpers.build(helpers.every_kind_specs(), shape)
  x, y = helpers.batch(shape, net.num_classes)
  with pytest.raises(ValueError, match=r'x must have shape \[B, 16, 16, 3\]'):
    net.forward(x[:, :8], y)
  with pytest.raises(ValueError, match=r'labels must have shape \[2, 1, 1, 1\]'):
    net.forward(x, y[:1])
  with pytest.raises(ValueError, match=r'labels must be in \[0, 5\)'):
    net.forward(x, y + 5)
  with pytest.raises(ValueError, match="bn must be 'batch' or 'running'"):
    net.forward(x, y, bn='moving')
  with pytest.raises(ValueError, match='call forward'):
    net.backward(0.1)
  with pytest.raises(ValueError, match='binit'):
    net.binit()


def test_models_have_paper_depths():
  assert len(models.cifar_resnet(18)) == 164
  assert len(models.imagenet_resnet()) == 152
  net = models.build(models.cifar_resnet(1), [2, 32, 32, 3], qtype=4)
  assert [l.out_ch for l in net.layers] == [s[1] for s in
                                            helpers.golden_specs()]
  assert [l.nl for l in net.layers] == [s[4] for s in helpers.golden_specs()]
