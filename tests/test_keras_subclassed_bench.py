"""bench/keras_subclassed.py at a tiny size: its code path and its output."""

import json

import keras
import numpy as np
import tensorflow as tf

from bench import keras_subclassed as ks


def test_subclassed_resnet_is_a_subclassed_model_with_layer_blocks():
  """Blocks are Layer subclasses holding Conv2D/BN/ReLU sublayers; compress
  gives the same forward pass."""
  from blpa.keras import compress  # pylint: disable=import-outside-toplevel
  model = ks.subclassed_resnet(blocks=1)
  assert not hasattr(model, '_nodes_by_depth') or not model._nodes_by_depth  # pylint: disable=protected-access
  block_cls, _ = ks.model_classes()
  assert len(model.stages) == 3
  assert all(type(b).__name__ == block_cls.__name__ for b in model.stages)
  assert isinstance(model.stages[0].relu2, keras.layers.ReLU)
  x = tf.random.normal([2, 32, 32, 3], seed=1)
  want = model(x, training=False)
  got = compress(model, 4)(x, training=False)
  np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_tiny_run_writes_the_tables_and_compressed_peak_is_lower(tmp_path):
  """Peaks (fresh BFC processes, two at a time) and interleaved step times
  at a tiny size, then the .md and .json. At batch 32 a ResNet-8 keeps
  about 8 MiB of float32 activations for backward in plain Keras and
  under 1 MiB compressed, so the compressed peak must be lower."""
  rows = ks.peaks(['plain', 'blpa4'], ['float32'], batch=32, blocks=1,
                  tries=1, parallel=2)
  by = {r['config']: r for r in rows}
  assert set(by) == {'plain', 'blpa4'}
  for r in rows:
    assert not r['errors'], r['errors']
    assert r['median'] == r['min'] == r['max'] > 0
    assert r['weight_bytes'] > 0
  assert by['blpa4']['median'] < by['plain']['median'], rows

  cpu = {}
  times = ks.step_times('float32', batch=4, rounds=2, blocks=1, cpu=cpu)
  assert keras.mixed_precision.global_policy().name == 'float32'
  assert set(times) == set(cpu) == {'plain', 'blpa4'}
  assert all(len(v) == 2 and min(v) > 0 for v in times.values())
  assert all(len(v) == 2 and min(v) > 0 for v in cpu.values())
  row = ks.time_row({'times': times, 'cpu_times': cpu,
                     'loadavg_before': [1.0, 1.0, 1.0],
                     'loadavg_after': [1.0, 1.0, 1.0], 'onednn': '0'})
  assert row['ratio'] > 0 and row['cpu_ratio'] > 0

  result = dict(date='2026-01-01T00:00', machine='test', command='test',
                args=dict(batch=32, tries=1, rounds=2), peaks=rows,
                times={'float32': row},
                summary=ks.summarize(rows, {'float32': row}),
                notes=['a note'])
  summary = result['summary']['float32, oneDNN 0']
  assert summary['peak_x_below'] > 1
  assert summary['peak_met'] in (True, False)
  assert summary['time_met'] in (True, False)
  text = ks.write_results(result, str(tmp_path))
  assert (tmp_path / 'keras_subclassed.md').read_text() == text
  assert '| 0 | float32 | subclassed ResNet-20, plain Keras |' in text
  assert 'compressed peak ≥ 3.5× below plain' in text
  assert 'a note' in text
  saved = json.loads((tmp_path / 'keras_subclassed.json').read_text())
  assert saved['summary']['float32, oneDNN 0']['time_target'] == 1.1


def test_mixed_bfloat16_step_times_restore_the_policy():
  """Under mixed_bfloat16 both steps run and the global policy comes back."""
  times = ks.step_times('mixed_bfloat16', batch=4, rounds=1, blocks=1)
  assert keras.mixed_precision.global_policy().name == 'float32'
  assert all(len(v) == 1 and v[0] > 0 for v in times.values())
