"""Tests of blpa.approx: samplers, sampled layers in every mode, conversion."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from blpa import approx
from blpa.approx import macs, nets, sampling

MODES_SAMPLERS = [(m, s) for m in ("forward", "backward", "blackbox")
                  for s in sampling.SAMPLERS
                  if m != "backward" or s in sampling.UNBIASED_SAMPLERS]
LAYERS = [
    (approx.ApproxDense, keras.layers.Dense, dict(units=6), (5, 12)),
    (approx.ApproxConv2D, keras.layers.Conv2D,
     dict(filters=6, kernel_size=3, padding="same", strides=2), (3, 8, 8, 10)),
]


def _pair(approx_cls, exact_cls, kwargs, shape, **approx_kwargs):
  """An approximate layer and the exact one, built, with the same weights."""
  exact = exact_cls(**kwargs)
  layer = approx_cls(**kwargs, **approx_kwargs)
  exact.build(shape)
  layer.build(shape)
  rng = np.random.default_rng(1)
  layer.set_weights([rng.normal(size=w.shape).astype(np.float32)
                     for w in exact.get_weights()])
  exact.set_weights(layer.get_weights())
  return layer, exact


def _grads(layer, x, training=True):
  """Output and gradients (input, kernel, bias) of a squared loss."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(tf.square(y))
  grads = tape.gradient(loss, [x] + layer.trainable_weights)
  return [y] + [tf.convert_to_tensor(g) for g in grads]


def _inputs(shape, seed=2):
  return tf.constant(np.random.default_rng(seed).normal(size=shape),
                     tf.float32)


@pytest.mark.parametrize("mode,sampler", MODES_SAMPLERS)
@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_exact_when_k_is_n(classes, mode, sampler):
  """k == n (ratio 1, or minimal_k >= n), or training=False: bit-identical."""
  approx_cls, exact_cls, kwargs, shape = classes
  x = _inputs(shape)
  for extra in (dict(sample_ratio=1.0), dict(sample_ratio=0.3,
                                             minimal_k=100)):
    layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, mode=mode,
                         sampler=sampler, seed=3, **extra)
    assert layer.num_kept() == layer.kernel.shape[layer.kernel_in_axis]
    for got, want in zip(_grads(layer, x), _grads(exact, x)):
      np.testing.assert_array_equal(got.numpy(), want.numpy())
  layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, mode=mode,
                       sampler=sampler, sample_ratio=0.5, seed=3)
  np.testing.assert_array_equal(layer(x, training=False).numpy(),
                                exact(x, training=False).numpy())
  np.testing.assert_array_equal(layer(x).numpy(), exact(x).numpy())


def _fixed_uniforms(layer, seed=7):
  """Makes the layer's random draws known: each call of ``_uniform(n, k)``
  returns stateless draws seeded by (n, k); returns that function."""

  def uniform(n, k):
    shape = sampling.uniform_shape(layer.sampler, n, k)
    if shape is None:
      return None
    return tf.random.stateless_uniform(shape, seed=[seed, n * 1000 + k])

  layer._uniform = uniform  # pylint: disable=protected-access
  return uniform


def _expected_forward(layer, x, uniform):
  """What forward mode must compute, from the sampling primitives: for
  Dense ``sampled_matmul`` (``matmul_with`` at the layer's draws); for
  Conv2D the convolution of the kept channels with the kept, scaled kernel
  slices, indices and scales from ``sampling.draw`` on scores computed here.
  Output and gradients (input, kernel, bias) of the same squared loss."""
  w, b = tf.constant(layer.kernel.numpy()), tf.constant(layer.bias.numpy())
  n, k = w.shape[layer.kernel_in_axis], layer.num_kept()
  with tf.GradientTape() as tape:
    tape.watch([x, w, b])
    if layer.kernel_in_axis == 0:
      y = sampling.matmul_with(x, w, k, layer.sampler, uniform(n, k)) + b
    else:
      w_norms = np.sqrt((w.numpy() ** 2).sum(axis=(0, 1, 3)))
      x_norms = np.sqrt((x.numpy() ** 2).sum(axis=(0, 1, 2)))
      scores = w_norms if layer.sampler == "weight_topk" else w_norms * x_norms
      indices, scales = sampling.draw(layer.sampler, tf.constant(scores), k,
                                      uniform(n, k))
      w_kept = tf.gather(w, indices, axis=2)
      if scales is not None:
        w_kept = w_kept * scales[None, None, :, None]
      y = tf.nn.conv2d(tf.gather(x, indices, axis=3), w_kept,
                       layer.strides, layer.padding.upper()) + b
    loss = tf.reduce_sum(tf.square(y))
  return [y] + tape.gradient(loss, [x, w, b])


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_forward_mode_zero_outside_sample(classes, sampler):
  """Unselected features/channels get exactly zero input and kernel grads;
  output and kept gradients are those of the sampled product at the same
  indices and scales."""
  approx_cls, exact_cls, kwargs, shape = classes
  layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, sampler=sampler,
                       sample_ratio=0.5, seed=4)
  uniform = _fixed_uniforms(layer)
  x = _inputs(shape)
  y, grad_x, grad_w, grad_b = _grads(layer, x)
  in_axis = layer.kernel_in_axis
  other_w = tuple(a for a in range(grad_w.ndim) if a != in_axis)
  other_x = tuple(range(grad_x.ndim - 1))
  used_w = np.any(grad_w.numpy() != 0, axis=other_w)
  used_x = np.any(grad_x.numpy() != 0, axis=other_x)
  np.testing.assert_array_equal(used_w, used_x)
  k = layer.num_kept()
  assert 1 <= used_w.sum() <= (k if sampler != "bernoulli" else used_w.size)
  assert used_w.sum() < used_w.size or sampler == "bernoulli"
  y_exact, _, _, grad_b_exact = _grads(exact, x)
  assert not np.allclose(y.numpy(), y_exact.numpy())
  assert grad_b.shape == grad_b_exact.shape
  want = _expected_forward(layer, x, uniform)
  for name, g, w in zip(("output", "grad_x", "grad_kernel", "grad_bias"),
                        (y, grad_x, grad_w, grad_b), want):
    # Float rounding only (sums in another order): 1e-5 of the largest.
    np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0,
                               atol=1e-5 * np.abs(w.numpy()).max(),
                               err_msg=name)


@pytest.mark.parametrize("sampler", sampling.RANDOM_SAMPLERS)
@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_forward_mode_random_samplers_unbiased(classes, sampler):
  """crs and bernoulli in forward mode: the mean output of many draws
  approaches the exact output (one draw is far from it)."""
  approx_cls, exact_cls, kwargs, shape = classes
  layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, sampler=sampler,
                       sample_ratio=0.5, seed=4)
  x = _inputs(shape)
  want = exact(x).numpy()
  step = tf.function(lambda: layer(x, training=True))
  draws = np.stack([step().numpy() for _ in range(400)])
  single = np.linalg.norm(draws[0] - want)
  err = np.linalg.norm(draws.mean(0) - want)
  assert err < 0.2 * single, (err, single)


@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_topk_keeps_largest_scores(classes):
  """topk keeps the k largest ‖x_i‖·‖w_i‖; weight_topk the largest ‖w_i‖."""
  approx_cls, exact_cls, kwargs, shape = classes
  x = _inputs(shape)
  for sampler in ("topk", "weight_topk"):
    layer, _ = _pair(approx_cls, exact_cls, kwargs, shape, sampler=sampler,
                     sample_ratio=0.5)
    _, grad_x, _, _ = _grads(layer, x)
    used = np.any(grad_x.numpy() != 0, axis=tuple(range(grad_x.ndim - 1)))
    w = layer.kernel.numpy()
    w_norms = np.sqrt((np.moveaxis(w, layer.kernel_in_axis, -1) ** 2).reshape(
        -1, w.shape[layer.kernel_in_axis]).sum(0))
    x_norms = np.sqrt((x.numpy() ** 2).reshape(-1, x.shape[-1]).sum(0))
    scores = w_norms if sampler == "weight_topk" else w_norms * x_norms
    want = np.zeros(scores.size, bool)
    want[np.argsort(-scores)[:layer.num_kept()]] = True
    np.testing.assert_array_equal(used, want)


@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_blackbox_gradients_are_exact(classes):
  """Blackbox: sampled forward output, the exact layer's gradients."""
  approx_cls, exact_cls, kwargs, shape = classes
  layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, mode="blackbox",
                       sample_ratio=0.5)
  x = _inputs(shape)
  y_sampled = layer(x, training=True)
  assert not np.allclose(y_sampled.numpy(), exact(x).numpy())
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = layer(x, training=True)
  got = tape.gradient(out, [x, layer.kernel, layer.bias],
                      output_gradients=tf.ones_like(out) * 0.5)
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = exact(x, training=True)
  want = tape.gradient(out, [x, exact.kernel, exact.bias],
                       output_gradients=tf.ones_like(out) * 0.5)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g.numpy(), w.numpy())


@pytest.mark.parametrize("classes", LAYERS, ids=["dense", "conv"])
def test_backward_mode_exact_forward_unbiased_gradients(classes):
  """Backward mode: exact output; grads average to the exact grads."""
  approx_cls, exact_cls, kwargs, shape = classes
  layer, exact = _pair(approx_cls, exact_cls, kwargs, shape, mode="backward",
                       sampler="bernoulli", sample_ratio=0.5, seed=5)
  x = _inputs(shape)
  want = _grads(exact, x)
  step = tf.function(lambda: _grads(layer, x))
  draws = [step() for _ in range(400)]
  np.testing.assert_array_equal(draws[0][0].numpy(), want[0].numpy())
  for i in (1, 2):
    mean = np.mean([d[i].numpy() for d in draws], axis=0)
    single = np.linalg.norm(draws[0][i].numpy() - want[i].numpy())
    err = np.linalg.norm(mean - want[i].numpy())
    assert err < 0.2 * single, (i, err, single)


def _monte_carlo_errors(sampler, draws_list, seed=0):
  """Relative errors of the mean of sampled_matmul estimates."""
  rng = np.random.default_rng(seed)
  a = tf.constant(rng.normal(size=(8, 40)), tf.float32)
  b = tf.constant(rng.normal(size=(40, 6)) *
                  rng.uniform(0.1, 2, size=(40, 1)), tf.float32)
  exact = (a @ b).numpy()
  k = 10
  estimate = tf.function(
      lambda u: sampling.matmul_with(a, b, k, sampler, u))
  shape = sampling.uniform_shape(sampler, 40, k)
  total, count, errors = np.zeros_like(exact, np.float64), 0, []
  for draws in draws_list:
    while count < draws:
      total += estimate(tf.constant(rng.uniform(size=shape),
                                    tf.float32)).numpy()
      count += 1
    errors.append(np.linalg.norm(total / count - exact) /
                  np.linalg.norm(exact))
  return errors


@pytest.mark.parametrize("sampler", ["crs", "bernoulli"])
def test_random_samplers_unbiased(sampler):
  """The mean of many draws converges to a @ b like 1/sqrt(draws)."""
  errors = _monte_carlo_errors(sampler, [25, 400, 1600])
  assert errors[1] < errors[0] / 2, errors
  assert errors[2] < errors[0] / 4, errors
  assert errors[2] < 0.05, errors


def test_topk_is_biased():
  """topk's estimate does not converge (a check that the test can fail)."""
  rng = np.random.default_rng(0)
  a = tf.constant(rng.normal(size=(8, 40)), tf.float32)
  b = tf.constant(rng.normal(size=(40, 6)), tf.float32)
  got = approx.sampled_matmul(a, b, 10, "topk").numpy()
  assert np.linalg.norm(got - (a @ b).numpy()) > 0.1 * np.linalg.norm(
      (a @ b).numpy())


def test_bernoulli_all_zero_scores_is_exact():
  """With no nonzero score, bernoulli computes the product exactly."""
  a = tf.zeros([3, 5])
  b = tf.random.normal([5, 2])
  indices, scales = sampling.draw("bernoulli", tf.zeros([5]), 2,
                                  tf.random.uniform([5]))
  np.testing.assert_array_equal(indices.numpy(), np.arange(5))
  np.testing.assert_array_equal(scales.numpy(), np.ones(5))
  np.testing.assert_array_equal(
      approx.sampled_matmul(a, b, 2, "bernoulli", seed=1).numpy(),
      np.zeros([3, 2]))


def test_sampled_matmul_exact_and_errors():
  a = tf.random.normal([4, 6])
  b = tf.random.normal([6, 3])
  for sampler in sampling.SAMPLERS:
    np.testing.assert_array_equal(
        approx.sampled_matmul(a, b, 6, sampler).numpy(), (a @ b).numpy())
  with pytest.raises(ValueError, match="inner dimensions"):
    approx.sampled_matmul(a, tf.zeros([5, 3]), 2)
  with pytest.raises(ValueError, match="2-D"):
    approx.sampled_matmul(a[None], b, 2)
  with pytest.raises(ValueError, match="sampler"):
    approx.sampled_matmul(a, b, 2, "uniform")
  with pytest.raises(ValueError, match="k must be"):
    approx.sampled_matmul(a, b, 0)


def test_num_samples():
  assert approx.num_samples(10, 0.5) == 5
  assert approx.num_samples(10, 0.33) == 3   # int truncates
  assert approx.num_samples(10, 0.01, 2) == 2
  assert approx.num_samples(3, 0.5, 7) == 3
  assert approx.num_samples(64, 1.0) == 64
  for bad in (0.0, 1.5, -0.1, "0.5", True):
    with pytest.raises(ValueError, match="sample_ratio"):
      approx.num_samples(10, bad)
  with pytest.raises(ValueError, match="minimal_k"):
    approx.num_samples(10, 0.5, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sample_ratio=0.0), "sample_ratio"),
    (dict(sample_ratio=2.0), "sample_ratio"),
    (dict(minimal_k=0), "minimal_k"),
    (dict(mode="sideways"), "mode"),
    (dict(sampler="random"), "sampler"),
    (dict(mode="backward", sampler="topk"), "unbiased"),
    (dict(mode="backward", sampler="weight_topk"), "unbiased"),
    (dict(seed="x"), "seed"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    approx.ApproxDense(4, **kwargs)
  with pytest.raises(ValueError, match=match):
    approx.ApproxConv2D(4, 3, **kwargs)


def test_conv_groups_and_channels_first_need_ratio_one():
  with pytest.raises(ValueError, match="groups"):
    approx.ApproxConv2D(4, 3, groups=2, sample_ratio=0.5)
  with pytest.raises(ValueError, match="channels_last"):
    approx.ApproxConv2D(4, 3, data_format="channels_first", sample_ratio=0.5)
  approx.ApproxConv2D(4, 3, groups=2)  # exact: accepted


def test_serialization(tmp_path):
  """get_config/from_config and a saved .keras model keep everything."""
  layer = approx.ApproxConv2D(5, 3, sample_ratio=0.4, minimal_k=2,
                              mode="blackbox", sampler="crs", seed=7,
                              padding="same")
  config = layer.get_config()
  clone = approx.ApproxConv2D.from_config(config)
  assert clone.get_config() == config
  assert (clone.sample_ratio, clone.minimal_k, clone.mode, clone.sampler,
          clone.seed) == (0.4, 2, "blackbox", "crs", 7)
  inp = keras.Input((6,))
  model = keras.Model(inp, approx.ApproxDense(3, sample_ratio=0.5,
                                              sampler="bernoulli")(inp))
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded.layers[1], approx.ApproxDense)
  assert loaded.layers[1].sampler == "bernoulli"
  x = np.ones((2, 6), np.float32)
  np.testing.assert_array_equal(loaded.predict(x, verbose=0),
                                model.predict(x, verbose=0))


def test_approximate_model():
  """approximate() replaces layers, keeps ends exact, copies weights."""
  base = nets.wide_resnet(10, 1, input_shape=(8, 8, 3))
  model = approx.approximate(base, 0.5)
  kinds = [(type(l).__name__, getattr(l, "sample_ratio", None))
           for l in model.layers
           if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]
  assert kinds[0] == ("Conv2D", None) and kinds[-1] == ("Dense", None)
  assert all(k == ("ApproxConv2D", 0.5) for k in kinds[1:-1])
  for w, v in zip(base.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(w, v)
  x = _inputs((2, 8, 8, 3))
  np.testing.assert_array_equal(base(x).numpy(), model(x).numpy())
  assert not np.allclose(base(x, training=True).numpy(),
                         model(x, training=True).numpy())
  every = approx.approximate(base, 0.5, skip=None)
  assert all(isinstance(l, (approx.ApproxDense, approx.ApproxConv2D))
             for l in every.layers
             if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D)))
  with pytest.raises(ValueError, match="does not have"):
    approx.approximate(base, 0.5, skip=["nope"])


def test_approximate_mlp_keeps_input_layer_exact():
  """Without a Conv2D, 'ends' keeps the first and the last Dense exact."""
  model = approx.approximate(nets.mlp(16, (8, 8, 8)), 0.5)
  kinds = [type(l).__name__ for l in model.layers
           if isinstance(l, keras.layers.Dense)]
  assert kinds == ["Dense", "ApproxDense", "ApproxDense", "Dense"]


def test_training_macs():
  """MACs counted per product: a hand count, and the WRN saving at 0.5."""
  model = approx.approximate(nets.mlp(64, (500, 500)), 0.5, skip=None)
  count = macs.training_macs(model, 32)
  first = count["layers"][model.layers[1].name]
  assert first == {"forward": 32 * 32 * 500, "grad_input": 0,
                   "grad_kernel": 32 * 32 * 500}
  base = nets.wide_resnet(10, 2, input_shape=(16, 16, 3))
  exact = macs.training_macs(base, 8)["total"]
  half = macs.training_macs(approx.approximate(base, 0.5), 8)["total"]
  assert half < 0.6 * exact


def _fit_data():
  x = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
  return x, (x[:, :3].sum(1) > 0).astype(np.int32)


def _fitted(model, x, y, **fit_kwargs):
  model.compile(keras.optimizers.SGD(0.1),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  hist = model.fit(x, y, verbose=0, shuffle=False, **fit_kwargs)
  return hist.history["loss"], model.get_weights()


def test_fit_trains():
  """fit with approximate layers: at ratio 1 (or k == n by minimal_k) the
  very weights of the exact model; at 0.5 the loss falls, and one step is the SGD step of the
  sampled gradient (not the exact one)."""
  x, y = _fit_data()
  keras.utils.set_random_seed(0)
  base = nets.mlp(10, (32,), classes=2)
  w0 = base.get_weights()
  same = approx.approximate(base, 1.0, skip=None)
  assert all(isinstance(l, approx.ApproxDense) for l in same.layers
             if isinstance(l, keras.layers.Dense))
  # minimal_k >= every layer's inputs (10, 32): k == n, exact as well.
  kept_all = approx.approximate(base, 0.5, minimal_k=32, skip=None)
  _, want = _fitted(base, x, y, epochs=3, batch_size=16)
  for other in (same, kept_all):
    _, got = _fitted(other, x, y, epochs=3, batch_size=16)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)
  base.set_weights(w0)
  model = approx.approximate(base, 0.5, skip=None)
  loss, _ = _fitted(model, x, y, epochs=8, batch_size=16)
  assert loss[-1] < 0.8 * loss[0], loss
  # One full-batch step from w0: w0 - 0.1 * (gradient of the sampled model).
  model = approx.approximate(base, 0.5, skip=None)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  with tf.GradientTape() as tape:
    sampled = loss_fn(y, model(x, training=True))
  grads = tape.gradient(sampled, model.trainable_weights)
  with tf.GradientTape() as tape:
    exact = loss_fn(y, base(x, training=True))
  exact_grads = tape.gradient(exact, base.trainable_weights)
  assert not np.allclose(grads[0].numpy(), exact_grads[0].numpy())
  _, got = _fitted(model, x, y, epochs=1, batch_size=64)
  for g, w, grad in zip(got, w0, grads):
    np.testing.assert_allclose(g, w - 0.1 * grad.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_backward_mode_samples_outputs_and_batch():
  """Backward mode samples when its output features or batch allow it,
  even when every input feature would be kept: grad-input is
  ``sampled_matmul(g, wᵀ)`` over output features, grad-kernel
  ``sampled_matmul(xᵀ, g)`` over the batch, at the layer's draws; the mean
  of many draws is the exact gradient."""
  layer, exact = _pair(approx.ApproxDense, keras.layers.Dense,
                       dict(units=40), (16, 12), mode="backward",
                       sampler="crs", sample_ratio=0.5, minimal_k=12, seed=1)
  assert layer.num_kept() == 12
  x = _inputs((16, 12))
  want = _grads(exact, x)
  step = tf.function(lambda: _grads(layer, x))
  draws = [step() for _ in range(300)]
  got = draws[0]
  np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
  assert not np.allclose(got[1].numpy(), want[1].numpy())
  assert not np.allclose(got[2].numpy(), want[2].numpy())
  for i in (1, 2):
    mean = np.mean([d[i].numpy() for d in draws], axis=0)
    single = np.linalg.norm(got[i].numpy() - want[i].numpy())
    err = np.linalg.norm(mean - want[i].numpy())
    assert err < 0.2 * single, (i, err, single)
  # The same draws as sampled_matmul: 20 of 40 outputs, 12 of 16 examples.
  uniform = _fixed_uniforms(layer)
  _, grad_x, grad_w, _ = _grads(layer, x)
  w = tf.constant(layer.kernel.numpy())
  g = 2 * (x @ w + layer.bias)  # d(sum y²)/dy
  np.testing.assert_allclose(
      grad_x.numpy(), sampling.matmul_with(
          g, tf.transpose(w), 20, "crs", uniform(40, 20)).numpy(),
      rtol=1e-5, atol=1e-5, err_msg="grad_x")
  np.testing.assert_allclose(
      grad_w.numpy(), sampling.matmul_with(
          tf.transpose(x), g, 12, "crs", uniform(16, 12)).numpy(),
      rtol=1e-5, atol=1e-5, err_msg="grad_kernel")


def test_recalibrate_batch_norm():
  """BN statistics become the averages over exact forward passes."""
  from blpa.approx.calibrate import exact_layers, recalibrate_batch_norm
  inp = keras.Input((6, 6, 4))
  x = keras.layers.Conv2D(8, 3, padding="same")(inp)
  x = keras.layers.Conv2D(5, 3, padding="same")(x)
  norm = keras.layers.BatchNormalization(momentum=0.9)
  model = approx.approximate(keras.Model(inp, norm(x)), 0.5)
  pre_bn = keras.Model(model.inputs, model.layers[-1].input)
  batches = [_inputs((4, 6, 6, 4), seed) for seed in (1, 2)]
  assert recalibrate_batch_norm(model, batches) == 2
  means = [np.mean(pre_bn(b, training=False).numpy(), axis=(0, 1, 2))
           for b in batches]
  np.testing.assert_allclose(model.layers[-1].moving_mean.numpy(),
                             np.mean(means, 0), rtol=1e-5, atol=1e-6)
  assert model.layers[-1].momentum == 0.9
  layer = model.layers[2]
  with exact_layers(model):
    assert layer.sample_ratio == 1.0
  assert layer.sample_ratio == 0.5


def test_experiment_compare_runs():
  """The lockstep comparison reports counted MACs, times, accuracies, the
  exact tail and the selection statistics."""
  from blpa.approx import experiments
  x_train, y_train, x_test, y_test = experiments.digits()
  data = (x_train[:256], y_train[:256], x_test[:64], y_test[:64])
  rows = experiments.compare("mlp", lambda: nets.mlp(64, (32, 32)), data, 1,
                             64, 0.05, skip=None,
                             arms=[(1.0, 0.0), (0.5, 0.0), (0.5, 0.5),
                                   (0.5, 0.0, "ends")])
  assert [(r["ratio"], r["exact_tail"]) for r in rows] == [
      (1.0, 0.0), (0.5, 0.0), (0.5, 0.5), (0.5, 0.0)]
  assert rows[0]["macs_saved"] == 0 and rows[1]["macs_saved"] == 0.5
  assert 0 < rows[3]["macs_saved"] < 0.5  # its first and last layer exact
  assert [r["exact_tail_steps"] for r in rows] == [0, 0, 2, 0]
  assert rows[2]["schedule_macs_saved"] == pytest.approx(0.5 * 2 / 4)
  assert all(r["steps"] == 4 and r["step_time_s"] > 0 and
             r["schedule_speedup"] > 0 and 0 <= r["test_accuracy"] <= 1
             for r in rows)
  assert rows[1]["selection"]["steps"] == 2
  assert "selection" not in rows[2]
  table = "\n".join(experiments._table(rows))
  assert "| 0.5, exact last 50% |" in table
  assert "| 0.5, ends exact |" in table


def test_experiment_summary_pairs_seeds():
  """The summary averages each arm over its seeds and measures every gap
  against the exact model of the same seed."""
  from blpa.approx import experiments
  def row(seed, ratio, accuracy):
    return dict(experiment=f"net, seed {seed}", ratio=ratio, exact_tail=0.0,
                test_accuracy=accuracy, macs_saved=0.5 * (ratio < 1),
                schedule_macs_saved=0.4 * (ratio < 1), speedup=1.5,
                schedule_speedup=1.25)
  rows = [row(0, 1.0, 0.99), row(0, 0.5, 0.985), row(1, 1.0, 0.97),
          row(1, 0.5, 0.95)]
  lines = experiments._summary_table(rows)
  assert len(lines) == 3
  assert lines[2] == ("| net | 0.5 | 2 | 96.75% (98.00%) | 1.25 pt (0.50 to "
                      "2.00) | 1 of 2 | 50.0% / 40.0% | 1.50× / 1.25× |")


@pytest.mark.slow
def test_experiments_quick(tmp_path):
  """The experiments command in its smoke mode writes its three files."""
  from blpa.approx import experiments
  assert experiments.main(["--quick", "--out", str(tmp_path)]) == 0
  for name in ("approx.md", "approx.json", "approx.png"):
    assert (tmp_path / name).stat().st_size > 0


def test_experiments_main_runs_every_comparison(tmp_path, monkeypatch):
  """experiments.main's own path with --quick (which comparisons, with what
  networks, data, epochs, arms and seeds; the results and its three files),
  each comparison replaced by a record of its call that returns a row per
  arm; compare itself trains in test_experiment_compare_runs, the
  communication process runs in test_experiments_communication_only."""
  import json  # pylint: disable=import-outside-toplevel
  from blpa.approx import experiments  # pylint: disable=import-outside-toplevel
  calls = []

  def compare(name, build, data, epochs, batch, lr, skip, arms=None, seed=0,
              track_ratio=0.5):
    model = build()
    calls.append((name, model.input_shape[1:], data[0].shape[1:], epochs,
                  batch, lr, skip, [tuple(a) for a in arms], seed,
                  track_ratio))
    return [dict(experiment=name, ratio=a[0],
                 exact_tail=a[1] if a[0] < 1 else 0.0,
                 exact_layers=experiments._skip_label(a[2])  # pylint: disable=protected-access
                 if len(a) > 2 else None,
                 macs_per_step=int(1e6 * a[0]), macs_saved=1 - a[0],
                 schedule_macs_saved=(1 - a[0]) * (1 - a[1]),
                 step_time_s=0.01, speedup=1.5, schedule_speedup=1.25,
                 test_accuracy=0.9 - seed / 100, test_accuracy_raw=0.8)
            for a in arms]

  comm = dict(network="WRN-10-1", ratio=1 / 3, full_bytes=3e6,
              compressed_bytes=1e6, saved=2 / 3, bit_identical=True)
  asked = []
  monkeypatch.setattr(experiments, "compare", compare)
  monkeypatch.setattr(experiments, "_communication_subprocess",
                      lambda args: asked.append((args.depth, args.width))
                      or comm)
  assert experiments.main(["--quick", "--mlp-seeds", "3", "4", "5",
                           "--out", str(tmp_path)]) == 0
  tail = experiments.EXACT_TAIL
  mlp = "MLP 64-500-500-10, digits"
  mlp_arms = [(1.0, 0.0), (0.5, 0.0), (0.33, 0.0), (0.5, 0.0, None),
              (0.5, tail, None)]
  wrn_arms = [(1.0, 0.0), (0.5, tail), (0.33, tail)]
  assert calls == [
      (f"{mlp}, seed 3", (64,), (64,), 1, 64, 0.05, "ends", mlp_arms, 3, 0.5),
      (f"{mlp}, seed 4", (64,), (64,), 1, 64, 0.05, "ends", mlp_arms, 4,
       None),
      ("WRN-10-1, 1 epochs", (32, 32, 3), (32, 32, 3), 1, 32, 0.05, "ends",
       wrn_arms, 0, 0.5),
      ("WRN-10-2, 1 epochs", (32, 32, 3), (32, 32, 3), 1, 32, 0.05, "ends",
       [(1.0, 0.0), (0.5, 0.0), (0.5, tail), (0.33, tail)], 0, 0.5)]
  assert asked == [(10, 1)]
  result = json.loads((tmp_path / "approx.json").read_text())
  assert len(result["rows"]) == 2 * 5 + 3 + 4
  assert result["communication"] == comm
  assert result["command"] == ("python -m blpa.approx.experiments --quick "
                               "--mlp-seeds 3 4 5 --out " + str(tmp_path))
  text = (tmp_path / "approx.md").read_text()
  assert "full 3.00 MB, compressed 1.00 MB (66.7% less)" in text
  assert f"| {mlp} | 0.5 | 2 | 86.50% (86.50%) | 0.00 pt" in text
  assert (tmp_path / "approx.png").stat().st_size > 0


def test_experiments_communication_only():
  """``--comm-only`` in a fresh process (two logical CPU devices), as main
  runs it: the compressed all-reduce sends fewer bytes and gives the full
  one's gradients bit for bit."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.conftest import ROOT  # pylint: disable=import-outside-toplevel
  proc = subprocess.run(
      [sys.executable, "-m", "blpa.approx.experiments", "--comm-only",
       "--depth", "10", "--width", "1"], capture_output=True, text=True,
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  comm = json.loads(proc.stdout.strip().splitlines()[-1])
  assert comm["network"] == "WRN-10-1" and comm["bit_identical"] is True
  assert 0 < comm["compressed_bytes"] < comm["full_bytes"]
  assert comm["saved"] == pytest.approx(
      1 - comm["compressed_bytes"] / comm["full_bytes"])
