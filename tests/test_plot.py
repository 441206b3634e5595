"""blpa.plot: curves of one or more runs into one PNG."""

import json

from PIL import Image

from blpa import plot


def _write_log(path, scale):
  with open(path, 'w') as f:
    for it in range(10, 101, 10):
      f.write(json.dumps({'iter': it, 'loss': scale / it, 'acc': it / 100,
                          'lr': 0.1, 'ips': 100.0}) + '\n')
      if it % 50 == 0:
        f.write(json.dumps({'iter': it, 'val_loss': 1.0, 'val_acc': 0.5,
                            'val_loss_running': 1.1,
                            'val_acc_running': 0.4}) + '\n')


def test_two_runs_into_one_png(tmp_path, capsys):
  logs = [str(tmp_path / 'q0.jsonl'), str(tmp_path / 'q4.jsonl')]
  _write_log(logs[0], 1.0)
  _write_log(logs[1], 2.0)
  out = str(tmp_path / 'sub' / 'curves.png')
  assert plot.main(logs + ['-o', out]) == 0
  assert f'wrote {out}' in capsys.readouterr().out
  with Image.open(out) as img:
    assert img.format == 'PNG' and img.size[0] > img.size[1] > 200


def test_read_log_splits_train_and_validation(tmp_path):
  path = str(tmp_path / 'r.jsonl')
  _write_log(path, 1.0)
  train, val = plot.read_log(path)
  assert [r['iter'] for r in val] == [50, 100] and len(train) == 10


def test_bad_log_is_a_clear_error(tmp_path, capsys):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"iter": 1, "loss": 2}\nnot json\n')
  assert plot.main([str(path), '-o', str(tmp_path / 'x.png')]) == 2
  assert 'bad.jsonl, line 2' in capsys.readouterr().err
