"""Tests of the fixed-point Keras layers, the format proposal and convert."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from blpa import fixedpoint as fx
from blpa.fixedpoint import conversion


def _gradients(layer, x, dy):
  """(dx, dkernel, dbias) of sum(dy * layer(x))."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x)
  return tape.gradient(y, [x, layer.kernel, layer.bias], dy), y


def _float_twin(layer, kernel, bias, input_shape):
  """The float Keras layer of `layer`'s config with the given weights."""
  config = layer.get_config()
  for key in ("weight_format", "bias_format", "rounding", "input_grad",
              "seed"):
    config.pop(key)
  base = (keras.layers.Conv2D if isinstance(layer, keras.layers.Conv2D) else
          keras.layers.Dense)
  twin = base.from_config(config)
  twin.build(input_shape)
  twin.kernel.assign(kernel)
  twin.bias.assign(bias)
  return twin


LAYER_CASES = [
    (lambda **kw: fx.FixedPointConv2D(4, 3, padding="same", strides=2, **kw),
     [2, 7, 7, 3]),
    (lambda **kw: fx.FixedPointDense(5, **kw), [6, 4]),
]


@pytest.mark.parametrize("make,shape", LAYER_CASES)
@pytest.mark.parametrize("input_grad", ["float", "rounded"])
def test_layer_gradients(make, shape, input_grad):
  """dW, db: the float layer's gradients at the rounded weights; dx at the
  float weights (faithful) or the rounded ones."""
  layer = make(weight_format=(1, 3), bias_format=(2, 1),
               input_grad=input_grad)
  x = tf.random.normal(shape)
  layer(x)
  layer.bias.assign(tf.random.normal(layer.bias.shape))
  w_fixed = fx.round_fixed(layer.kernel, 1, 3)
  b_fixed = fx.round_fixed(layer.bias, 2, 1)
  assert np.any(w_fixed.numpy() != layer.kernel.numpy())
  dy = tf.random.normal(layer(x).shape)
  (dx, dw, db), y = _gradients(layer, x, dy)
  at_fixed = _float_twin(layer, w_fixed, b_fixed, shape)
  (dx_r, dw_r, db_r), y_r = _gradients(at_fixed, x, dy)
  np.testing.assert_array_equal(y, y_r)
  np.testing.assert_allclose(dw, dw_r, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(db, db_r, rtol=1e-6, atol=1e-6)
  at_float = _float_twin(layer, layer.kernel, layer.bias, shape)
  dx_f = _gradients(at_float, x, dy)[0][0]
  want, other = (dx_f, dx_r) if input_grad == "float" else (dx_r, dx_f)
  np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(dx - other)) > 1e-3


def test_rounded_copy_at_every_call_not_stored():
  layer = fx.FixedPointDense(3, weight_format=(2, 2), use_bias=False)
  x = tf.eye(4)
  layer(x)
  assert len(layer.weights) == 1 and layer.kernel.trainable
  layer.kernel.assign(tf.fill([4, 3], 0.3))
  np.testing.assert_array_equal(layer(x), np.full([4, 3], 0.25))
  layer.kernel.assign(tf.fill([4, 3], 9.0))  # saturates at 1.75
  np.testing.assert_array_equal(layer(x), np.full([4, 3], 1.75))
  np.testing.assert_array_equal(layer.kernel.numpy(), np.full([4, 3], 9.0))


def test_activation_rounds_and_passes_gradient():
  layer = fx.FixedPointActivation(3, 2)
  x = tf.constant([0.125, -0.3, 7.0, -7.0])
  dy = tf.constant([1.0, 2.0, 3.0, 4.0])
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x)
  np.testing.assert_array_equal(y, [0.25, -0.25, 3.75, -3.75])
  np.testing.assert_array_equal(tape.gradient(y, x, dy), dy)


def test_stochastic_layers_draw_per_call_and_reproduce_with_seed():
  x = tf.fill([2000], 0.3)

  def two_calls(seed):
    layer = fx.FixedPointActivation(3, 2, "stochastic", seed=seed)
    return layer(x).numpy(), layer(x).numpy()

  a1, a2 = two_calls(5)
  b1, _ = two_calls(5)
  assert np.mean(a1 != a2) > 0.1  # a new draw per call
  np.testing.assert_array_equal(a1, b1)  # same seed, same sequence
  assert set(np.unique(a1)) == {0.25, 0.5}


def test_invalid_layer_arguments():
  with pytest.raises(ValueError, match="weight_format must be a pair"):
    fx.FixedPointDense(3, weight_format=8)
  with pytest.raises(ValueError, match="bd .* must be >= 1"):
    fx.FixedPointConv2D(3, 3, weight_format=(0, 8))
  with pytest.raises(ValueError, match="input_grad must be one of"):
    fx.FixedPointDense(3, weight_format=(2, 6), input_grad="exact")
  with pytest.raises(ValueError, match="rounding must be one of"):
    fx.FixedPointActivation(2, 6, rounding="up")


def test_serialization(tmp_path):
  model = keras.Sequential([
      keras.Input((6, 6, 2)),
      fx.FixedPointConv2D(3, 3, weight_format=(2, 6), bias_format=(3, 5),
                          rounding="stochastic", seed=4, name="c"),
      fx.FixedPointActivation(4, 4, name="a"),
      keras.layers.Flatten(),
      fx.FixedPointDense(2, weight_format=[1, 7], input_grad="rounded",
                         name="d"),
  ])
  for layer in model.layers:
    config = json.loads(json.dumps(layer.get_config()))
    assert type(layer).from_config(config).get_config() == layer.get_config()
  assert model.get_layer("c").get_config()["bias_format"] == [3, 5]
  path = str(tmp_path / "m.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  x = np.random.randn(3, 6, 6, 2).astype(np.float32)
  assert isinstance(loaded.get_layer("d"), fx.FixedPointDense)
  np.testing.assert_array_equal(loaded.get_layer("d").kernel.numpy(),
                                model.get_layer("d").kernel.numpy())
  # The loaded model computes what the saved one does, seeded stochastic
  # rounding included (the same draws, call after call).
  reloaded = keras.models.load_model(path)
  for _ in range(2):
    want = model(x).numpy()
    np.testing.assert_array_equal(loaded(x).numpy(), want)
    np.testing.assert_array_equal(reloaded(x).numpy(), want)
  assert np.any(want != 0)
  det = keras.Sequential(model.layers[1:])
  assert det(model.layers[0](x)).shape == (3, 2)


# ---------------------------------------------------------------------------
# Format proposal and conversion.


@pytest.mark.parametrize("max_abs,want", [(2.064, (3, 13)), (0.905, (1, 15)),
                                          (9.43, (5, 11)), (1.0, (1, 15)),
                                          (0.0, (1, 15)), (3e6, (16, 0))])
def test_weight_format_hand_computed(max_abs, want):
  assert conversion.weight_format(max_abs, 16) == want


def test_activation_format_rule():
  # 10000 values: 2% above 4 (in (4, 8]), 0.5% above 8, the rest below 1.
  rng = np.random.default_rng(0)
  v = rng.uniform(-1, 1, 10000)
  v[:150] = rng.uniform(4.5, 7.5, 150)
  v[150:200] = -rng.uniform(4.5, 7.5, 50)
  v[200:250] = rng.uniform(8.5, 20, 50)
  # share > 2^2 = 2.5% > 1%; share > 2^3 = 0.5% <= 1%  ->  m = 3
  assert conversion.activation_format(v, 16, 0.01) == (4, 12)
  assert conversion.activation_format(v, 8, 0.03) == (1, 7)  # 2.5% > 1
  assert conversion.activation_format(v, 8, 0.02) == (4, 4)  # 2.5% > 4
  assert conversion.activation_format(v, 16, 0.001) == (6, 10)  # 2^5 > 20
  assert conversion.activation_format(np.zeros(5), 8) == (1, 7)
  # the share equal to the threshold is allowed
  assert conversion.activation_format([0.5, 3.0], 8, 0.5) == (1, 7)


def _small_model():
  model = keras.Sequential([
      keras.Input((6, 6, 1)),
      keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
      keras.layers.Flatten(name="flat"),
      keras.layers.Dense(8, name="hidden"),
      keras.layers.ReLU(name="relu"),
      keras.layers.Dense(3, name="logits"),
  ])
  return model


def test_propose_formats_on_a_model():
  model = _small_model()
  kernel = np.zeros(model.get_layer("conv").kernel.shape, np.float32)
  kernel.flat[5] = -2.064  # the magnitude counts, not the signed max
  kernel.flat[6] = 1.0
  model.get_layer("conv").kernel.assign(kernel)
  model.get_layer("conv").bias.assign([100.0, 0.0, 0.0, 0.0])
  model.get_layer("hidden").kernel.assign(
      np.full(model.get_layer("hidden").kernel.shape, 0.905 / 2, np.float32))
  model.get_layer("logits").kernel.assign(
      np.full(model.get_layer("logits").kernel.shape, 9.43, np.float32))
  x = np.random.default_rng(0).uniform(0, 1, (8, 6, 6, 1))
  formats = fx.propose_formats(model, x, bits=16)
  assert formats["conv"]["weight"] == (3, 13)  # from the kernel, not bias
  assert formats["hidden"]["weight"] == (1, 15)
  assert formats["logits"]["weight"] == (5, 11)
  assert formats["logits"]["activation"] is None  # logits stay float
  # conv pre-activations: channel 0 is ~100 (a quarter of the values), so
  # at most 1% above 2^m needs 2^m >= 100: m = 7.
  assert formats["conv"]["activation"] == (8, 8)
  assert formats["conv"]["activation_saturated"] <= 0.01


def test_convert_builds_the_twin():
  model = _small_model()
  x = np.random.default_rng(1).standard_normal((32, 6, 6, 1)).astype(
      np.float32)
  # threshold 0: nothing saturates, so the twin is close to the float net.
  formats = fx.propose_formats(model, x, bits=16, threshold=0.0)
  twin = fx.convert(model, formats)
  names = [l.name for l in twin.layers]
  assert names == ["conv", "conv_fixed", "conv_act", "flat", "hidden",
                   "hidden_fixed", "relu", "logits"]
  assert isinstance(twin.get_layer("conv"), fx.FixedPointConv2D)
  assert isinstance(twin.get_layer("logits"), fx.FixedPointDense)
  assert twin.get_layer("conv").activation is keras.activations.linear
  assert twin.get_layer("hidden_fixed").bd == formats["hidden"]["activation"][0]
  for name in ("conv", "hidden", "logits"):
    np.testing.assert_array_equal(twin.get_layer(name).kernel.numpy(),
                                  model.get_layer(name).kernel.numpy())
  np.testing.assert_allclose(twin(x), model(x), atol=2e-3)
  sparsity_float = fx.activation_sparsity(model, x)
  sparsity_fixed = fx.activation_sparsity(twin, x)
  assert set(sparsity_float) == set(sparsity_fixed) == {"conv", "hidden"}
  for name in sparsity_float:
    assert sparsity_fixed[name] >= sparsity_float[name]
  coarse = fx.convert(model, fx.propose_formats(model, x, bits=3))
  assert fx.activation_sparsity(coarse, x)["conv"] > sparsity_float["conv"]
  with pytest.raises(ValueError, match="no entry for the layers"):
    fx.convert(model, {"conv": formats["conv"]})


def test_demo_tiny(tmp_path):
  from blpa.fixedpoint import demo  # pylint: disable=import-outside-toplevel
  result = demo.main(["--out", str(tmp_path), "--epochs", "2",
                      "--finetune-epochs", "1", "--bits", "16", "6",
                      "--filters", "4", "--train-size", "300"])
  assert (tmp_path / "fixedpoint_table.md").exists()
  assert (tmp_path / "accuracy_vs_bits.png").exists()
  rows = {r["bits"]: r for r in result["rows"]}
  assert set(rows) == {16, 6}
  for r in rows.values():
    assert 0 <= r["acc_before"] <= 1 and 0 <= r["acc_after"] <= 1
  assert abs(rows[16]["acc_before"] - result["float_acc"]) < 0.05
