"""python -m blpa.demo, shortened."""

from blpa import demo


def test_demo_trains_both_qtypes_and_reports(tmp_path, capsys):
  assert demo.main(['--iters', '40', '--out', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert 'qtype 0: test accuracy' in out and 'qtype 4: test accuracy' in out
  assert 'at 4 bits vs' in out and '% saved' in out
  for name in ('q0.jsonl', 'q4.jsonl', 'curves.png', 'q4.npz'):
    assert (tmp_path / name).exists(), name
