"""Target verdicts, Markdown tables and charts from the benchmark results."""

import os

import numpy as np

from bench import common

VARIANT_LABELS = {
    'blpa_q8': 'blpa qtype 8',
    'blpa_q4': 'blpa qtype 4',
    'naive_q8': 'naive 8-bit',
    'naive_q4': 'naive 4-bit',
    'fixed_q8_det': 'fixed-point 8-bit (det.)',
    'fixed_q8_sto': 'fixed-point 8-bit (stoch.)',
    'fixed_q4_det': 'fixed-point 4-bit (det.)',
    'fixed_q4_sto': 'fixed-point 4-bit (stoch.)',
}


#: Method labels short enough for a bar chart's axis.
SHORT_LABELS = {
    'keras': 'keras', 'keras_recompute': 'keras\n+recompute',
    'autodiff': 'twin', 'recompute': 'twin\n+recompute',
    'blpa_q0': 'blpa q0', 'blpa_q8': 'blpa q8', 'blpa_q4': 'blpa q4',
}


def _mib(b):
  return b / common.MIB


def _headline(results):
  cfg = results['config']
  return cfg['time_rblocks'], cfg['time_batch']


def _peak(results, key, rblocks, batch):
  for r in results.get('memory', {}).get('runs', []):
    if (r['method_key'], r['rblocks'], r['batch']) == (key, rblocks, batch):
      return r.get('peak_bytes')
  return None


def _fidelity_runs(results):
  """``(data set key, fidelity result)`` pairs; ``result['data']`` says
  what the data set is."""
  return [(k, v) for k, v in (results.get('fidelity') or {}).items()
          if 'states' in v]


def _quant_speedups(results):
  """``{(nbits, op): (native_ms, fallback_ms, speedup)}``, best of modes."""
  q = results.get('quant_ops') or {}
  native, python = q.get('native', {}), q.get('python', {})
  out = {}
  for nbits in (8, 4):
    for op in ('save', 'restore'):
      try:
        n = min(native[f'q{nbits}'][f'{op}_{m}_ms']
                for m in ('eager', 'function'))
        p = min(python[f'q{nbits}'][f'{op}_{m}_ms']
                for m in ('eager', 'function'))
      except KeyError:
        continue
      out[nbits, op] = (n, p, p / n)
  return out


def targets(results):
  """Verdicts on the issue's targets, as a list of dicts."""
  rblocks, batch = _headline(results)
  where = f'ResNet-{common.depth(rblocks)}, batch {batch}'
  if results.get('mode') == 'quick':
    where += ' (quick mode: not the target configuration)'
  out = []

  def add(name, target, measured, met, note=''):
    out.append({'name': name, 'target': target, 'measured': measured,
                'met': met, 'where': where, 'note': note})

  base = common.BASELINE
  q4, kp = (_peak(results, 'blpa_q4', rblocks, batch),
            _peak(results, base, rblocks, batch))
  if q4 and kp:
    add('peak memory', f'qtype 4 <= 1/10 of {base}',
        f'1/{kp / q4:.1f} ({_mib(q4):.0f} vs {_mib(kp):.0f} MiB)',
        q4 * 10 <= kp)
  mb = (results.get('max_batch') or {}).get('methods', {})
  best = {k: (v.get('best') or {}).get('batch') for k, v in mb.items()}
  if best.get('blpa_q4') and best.get(base):
    cap = results['max_batch']['cap_bytes']
    ratio = best['blpa_q4'] / best[base]
    add('largest batch', f'qtype 4 >= 6x {base} under {_mib(cap):.0f} MiB',
        f'{ratio:.1f}x ({best["blpa_q4"]} vs {best[base]})', ratio >= 6)
  timing = (results.get('timing') or {}).get('summary')
  if timing and base in timing:
    rr = timing.get('keras_recompute', {}).get('time_ratio', float('nan'))
    for key, limit in (('blpa_q4', 1.05), ('blpa_q0', 1.0)):
      if key in timing:
        r = timing[key]['time_ratio']
        add(f'step time {common.LABELS[key]}',
            f'{common.LABELS[key]} <= {limit:.2f}x {base}',
            f'{r:.2f}x (keras + recompute_grad {rr:.2f}x)', r <= limit)
  for data, fid in _fidelity_runs(results):
    init = fid['states']['init']
    cos4 = np.array(init['blpa_q4']['layer_cosine'])
    naive = np.array(init['naive_q4']['layer_cosine'])
    share = float(np.mean(cos4 >= 0.99))
    add(f'gradient cosine at init ({data})',
        'qtype 4 >= 0.99 in every layer, clearly above naive 4-bit',
        f'min {cos4.min():.3f}, median {np.median(cos4):.4f}, '
        f'{100 * share:.0f}% of layers >= 0.99; naive 4-bit min '
        f'{naive.min():.3f}, median {np.median(naive):.3f}',
        bool(cos4.min() >= 0.99 and cos4.min() > naive.max()),
        note=f'ResNet-{common.depth(fid["rblocks"])}, batch {fid["batch"]}')
  speed = _quant_speedups(results)
  if speed:
    worst = min(speed.items(), key=lambda kv: kv[1][2])
    (nbits, op), (_, _, s) = worst
    add('quantization kernels', 'C++ >= 5x the pure-TF fallback',
        'slowest: ' + ', '.join(f'{o} {b}-bit {v[2]:.1f}x'
                                for (b, o), v in sorted(speed.items())),
        s >= 5, note=f'lowest: {op} {nbits}-bit {s:.1f}x')
  return out


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def _table(header, rows):
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _fmt(v, spec, missing='—'):
  return missing if v is None else format(v, spec)


def _headline_table(results):
  rblocks, batch = _headline(results)
  base = common.BASELINE
  timing = (results.get('timing') or {}).get('summary') or {}
  mb = (results.get('max_batch') or {}).get('methods', {})
  pred = results.get('predicted_saved', {})
  base_peak = _peak(results, base, rblocks, batch)
  base_best = (mb.get(base, {}).get('best') or {}).get('batch')
  rows = []
  for key, label, _, _ in common.METHODS:
    peak = _peak(results, key, rblocks, batch)
    saved = (sum(l['bytes'] for l in pred[key]) if key in pred else None)
    t = timing.get(key, {})
    best = (mb.get(key, {}).get('best') or {}).get('batch')
    rows.append([
        label, _fmt(peak and _mib(peak), '.0f'),
        _fmt(peak and base_peak and base_peak / peak, '.1f'),
        _fmt(saved and _mib(saved), '.0f'),
        _fmt(t.get('median_s'), '.3f'), _fmt(t.get('time_ratio'), '.2f'),
        _fmt(t.get('images_per_s'), '.1f'),
        _fmt(t.get('throughput_ratio'), '.2f'),
        _fmt(best, 'd'), _fmt(best and base_best and best / base_best, '.1f')])
  cap = (results.get('max_batch') or {}).get('cap_bytes')
  return _table(
      ['method', 'peak MiB', f'{base} ÷ peak', 'saved acts MiB (predicted)',
       's/step', f'time × {base}', 'images/s', f'images/s × {base}',
       f'max batch ≤ {_fmt(cap and _mib(cap), ".0f")} MiB',
       f'max batch × {base}'], rows)


BREAKDOWN_LABELS = (
    ('weights', 'weights'),
    ('momentum', 'momentum'),
    ('compact_copies', 'K-bit copies (codes, σ, offsets)'),
    ('full_copies', 'full-precision copies (stem input, last layer)'),
    ('input_batch', 'input batch (images, labels)'),
    ('loss_gradient', 'loss gradient'),
    ('widest_activation', 'widest layer: restored activation, then the '
     'gradient w.r.t. its input (in turn)'),
    ('widest_gradient_out', 'widest layer: gradient at its conv output'),
    ('residual_gradient', 'pending residual gradient (widest residual)'),
    ('unexplained', 'unexplained (other temporaries of that layer)'),
)


def _breakdown(run):
  """A memory run's breakdown by :data:`BREAKDOWN_LABELS`, "unexplained"
  taken as the measured peak minus the other rows, so that the rows always
  add up to the peak (a breakdown stored by an older ``blpa.memory`` may
  hold kinds no longer listed)."""
  parts = dict(run['breakdown'])
  explained = sum(parts.get(name, 0) for name, _ in BREAKDOWN_LABELS
                  if name != 'unexplained')
  parts['unexplained'] = run['peak_bytes'] - explained
  return {name: parts.get(name, 0) for name, _ in BREAKDOWN_LABELS}


def _timed_steps(results):
  """``(steps, warmup)`` of the timing section as run (the configuration's
  when its results do not say)."""
  cfg, timing = results['config'], results.get('timing') or {}
  times = (timing.get('step_times') or {}).get(common.BASELINE)
  return (len(times) if times else cfg['time_steps'],
          timing.get('warmup', cfg['time_warmup']))


def _breakdown_table(results):
  """What blpa holds at its peak (headline configuration), by kind."""
  rblocks, batch = _headline(results)
  runs = {r['method_key']: r for r in results.get('memory', {}).get('runs', [])
          if (r['rblocks'], r['batch']) == (rblocks, batch)
          and 'breakdown' in r}
  keys = [k for k in ('blpa_q4', 'blpa_q8', 'blpa_q0') if k in runs]
  if not keys:
    return ''
  rows = [[label] + [f'{_mib(_breakdown(runs[k])[name]):.1f}' for k in keys]
          for name, label in BREAKDOWN_LABELS]
  rows.append(['**measured peak**'] +
              [f'**{_mib(runs[k]["peak_bytes"]):.1f}**' for k in keys])
  rows.append(['peak in forward / backward phase'] + [
      ' / '.join(f'{_mib(runs[k]["phase_peak_bytes"][p]):.0f}'
                 for p in ('forward', 'backward'))
      if 'phase_peak_bytes' in runs[k] else '—' for k in keys])
  return _table(['MiB'] + [common.LABELS[k] for k in keys], rows)


def _sweep_table(results, vary):
  """Peak MiB by method against depth (``vary='rblocks'``) or batch."""
  cfg = results['config']
  runs = results.get('memory', {}).get('runs', [])
  if vary == 'rblocks':
    fixed, values = ('batch', cfg['depth_batch']), cfg['depth_rblocks']
    head = [f'ResNet-{common.depth(v)}' for v in values]
  else:
    fixed, values = ('rblocks', cfg['batch_rblocks']), cfg['batches']
    head = [f'batch {v}' for v in values]
  rows = []
  for key, label, _, _ in common.METHODS:
    row = [label]
    for v in values:
      match = [r for r in runs if r['method_key'] == key and
               r[fixed[0]] == fixed[1] and r[vary] == v]
      peak = match[0].get('peak_bytes') if match else None
      row.append(_fmt(peak and _mib(peak), '.0f',
                      'skipped' if match else '—'))
    rows.append(row)
  return _table(['peak MiB'] + head, rows)


def _fidelity_table(results):
  rows = []
  for data, fid in _fidelity_runs(results):
    for state in ('init', 'trained'):
      if state not in fid['states']:
        continue
      s = fid['states'][state]
      for v, label in VARIANT_LABELS.items():
        if v not in s:  # results from before the variant existed
          continue
        cos = np.array(s[v]['layer_cosine'])
        rel = np.array(s[v]['layer_relative_error'])
        rows.append([data, state, label,
                     f'{cos.min():.4f}', f'{np.median(cos):.4f}',
                     f'{100 * np.mean(cos >= 0.99):.0f}%',
                     f'{np.median(rel):.3f}', f'{rel.max():.3f}'])
  return _table(['data', 'weights', 'gradient', 'min cosine',
                 'median cosine', 'layers ≥ 0.99', 'median rel. error',
                 'max rel. error'], rows)


def _activation_table(results):
  """Median over stored layers of clipping and restore error."""
  rows = []
  for data, fid in _fidelity_runs(results):
    for state, s in fid['states'].items():
      a = s.get('activations')
      if not a:
        continue
      rows.append([data, state, f'{100 * np.median(a["clip_fraction"]):.2f}%',
                   f'{np.median(a["q8_error"]):.3f}',
                   f'{np.median(a["q4_error"]):.3f}'])
  return _table(['data', 'weights', 'values with |y| ≥ 3 (clipped)',
                 'restore rel. error, 8-bit', 'restore rel. error, 4-bit'],
                rows) if rows else ''


def _quant_table(results):
  q = results.get('quant_ops') or {}
  native, python = q.get('native', {}), q.get('python', {})
  if 'q8' not in native:
    return ''
  rows = []
  for nbits in (8, 4):
    for op in ('save', 'restore'):
      n, p = native[f'q{nbits}'], python.get(f'q{nbits}', {})
      nat = min(n[f'{op}_eager_ms'], n[f'{op}_function_ms'])
      traffic = n[f'{op}_traffic_bytes']
      fb_e, fb_f = p.get(f'{op}_eager_ms'), p.get(f'{op}_function_ms')
      fb = min(fb_e, fb_f) if fb_e and fb_f else None
      rows.append([f'{op} {nbits}-bit', f'{nat:.2f}',
                   f'{traffic / nat / 1e6:.1f}', _fmt(fb_e, '.2f'),
                   _fmt(fb_f, '.2f'), _fmt(fb and fb / nat, '.1f')])
  copy = min(q['tf_copy_ms'], q['numpy_copy_ms'])
  rows.append(['copy of the float activation', f'{copy:.2f}',
               f'{q["copy_traffic_bytes"] / copy / 1e6:.1f}', '', '', ''])
  return _table(['op', 'C++ ms', 'C++ GB/s (read+written)',
                 'fallback ms (eager)', 'fallback ms (tf.function)',
                 'speedup (best vs best)'], rows)


def _dates(results):
  """When each section was measured, if not all in this run."""
  dates = results.get('section_dates') or {}
  if len(set(d[:16] for d in dates.values())) < 2:
    return ''
  return ' Sections measured: ' + ', '.join(
      f'{name} {date.replace("T", " ")}' for name, date in dates.items()) + '.'


def markdown(results):
  cfg, m = results['config'], results['machine']
  rblocks, batch = _headline(results)
  lines = [
      f'# blpa benchmark ({results["mode"]} mode)', '',
      f'Machine: {m["cpu"]}, {m["cores"]} cores, {m["ram_gib"]} GiB RAM, '
      f'device {m["device"]}; TensorFlow {m["tensorflow"]}, Python '
      f'{m["python"]}. Run {results["date"]}, '
      f'{results.get("duration_s", 0) / 60:.0f} min.' + _dates(results), '',
      f'## ResNet-{common.depth(rblocks)}, batch {batch}, '
      f'{cfg["size"]}x{cfg["size"]}', '',
      'Peak: BFC allocator peak of a training step, each configuration in '
      'its own process with one inter-op thread (weights, momentum, stored '
      'activations and temporaries). Time: median of '
      f'{_timed_steps(results)[0]} interleaved steps after '
      f'{_timed_steps(results)[1]} warm-up steps, default threading. Max batch: largest batch measured '
      'under the cap (extrapolated from the batch sweep, then verified).', '',
      _headline_table(results), '',
      f'Ratios against `{common.BASELINE}` '
      f'({common.LABELS[common.BASELINE]}), measured in the same run. '
      f'TF_ENABLE_ONEDNN_OPTS={m.get("onednn", "?")} for every method.', '']
  breakdown = _breakdown_table(results)
  if breakdown:
    lines += [
        '## What blpa holds at its peak', '',
        'From known tensor sizes (weights, optimizer state, stored copies, '
        'the input, the widest layer\'s full-precision activation and '
        'gradients, the residual gradient); "unexplained" is the measured '
        'peak minus their sum.', '', breakdown, '']
  if results.get('headline_memory_date'):
    lines += [
        f'The ResNet-{common.depth(rblocks)} batch-{batch} peaks were '
        f'measured on {results["headline_memory_date"].replace("T", " ")} '
        '(`--headline`); the other rows of the sweeps below are from the run '
        f'of {results.get("sweep_date", "an earlier run").replace("T", " ")} '
        '(— : not measured there).', '']
  for key, date in sorted(results.get('methods_memory_dates', {}).items()):
    lines += [f'All rows of {common.LABELS[key]} were re-measured on '
              f'{date.replace("T", " ")} (`--methods`).', '']
  lines += [
      f'## Peak memory against depth (batch {cfg["depth_batch"]})', '',
      _sweep_table(results, 'rblocks'), '',
      f'## Peak memory against batch '
      f'(ResNet-{common.depth(cfg["batch_rblocks"])})', '',
      _sweep_table(results, 'batch'), '']
  skipped = results.get('memory', {}).get('skipped', [])
  if skipped:
    lines += ['Skipped: ' + '; '.join(
        f'{common.LABELS[s["method_key"]]} ResNet-{common.depth(s["rblocks"])}'
        f' batch {s["batch"]} ({s["reason"]})' for s in skipped), '']
  fids = _fidelity_runs(results)
  if fids:
    fid = fids[0][1]
    tr = fid.get('training', {})
    lines += [
        f'## Gradient fidelity (ResNet-{common.depth(fid["rblocks"])}, '
        f'batch {fid["batch"]}, weight decay 0)', '',
        'Per layer: cosine and relative error of the layer\'s gradient (all '
        'its weights) against the exact one (blpa qtype 0; GradientTape '
        'agrees to ~1e-5). "trained": after '
        f'{tr.get("iters", "?")} exact momentum-SGD iterations at batch '
        f'{tr.get("batch", "?")} on the same data.', '',
        _fidelity_table(results), '',
        'Data: ' + '; '.join(f'{k}: {v["data"]}' for k, v in fids) + '.',
        '']
    acts = _activation_table(results)
    if acts:
      lines += [
          'Why: the error of the activation each layer\'s backward reads, '
          'relu(ã·cs) against the exact relu(y·cs + b), median over the '
          'layers with K-bit copies; values with |y| ≥ 3 (normalized units) '
          'fall outside the quantizer\'s range and are clipped.', '', acts,
          '']
  quant = _quant_table(results)
  if quant:
    shape = results['quant_ops']['shape']
    lines += [f'## Quantization ops, activation {shape}', '', quant, '']
  lines += ['## Targets', '',
            _table(['target', 'measured', 'verdict'],
                   [[f'{t["name"]}: {t["target"]}', t['measured'],
                     {True: 'met', False: 'MISSED', None: 'n/a'}[t['met']]]
                    for t in results.get('targets', [])]), '']
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Charts
# ----------------------------------------------------------------------------


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path):
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  _plt().close(fig)


def _memory_chart(results, path, vary):
  plt = _plt()
  cfg = results['config']
  runs = results.get('memory', {}).get('runs', [])
  if vary == 'rblocks':
    fixed, values = ('batch', cfg['depth_batch']), cfg['depth_rblocks']
    xs = [common.depth(v) for v in values]
    xlabel, title = 'layers', f'peak memory vs depth (batch {fixed[1]})'
  else:
    fixed, values = ('rblocks', cfg['batch_rblocks']), cfg['batches']
    xs = list(values)
    xlabel = 'batch size'
    title = f'peak memory vs batch (ResNet-{common.depth(fixed[1])})'
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, (key, label, method, _) in enumerate(common.METHODS):
    rows = [(x, r) for x, v in zip(xs, values) for r in runs
            if r['method_key'] == key and r[fixed[0]] == fixed[1] and
            r[vary] == v and 'peak_bytes' in r]
    if not rows:
      continue
    ax.plot([x for x, _ in rows], [_mib(r['peak_bytes']) for _, r in rows],
            marker='o', color=f'C{i}', label=label)
    if method == 'blpa' and key != 'blpa_q8':
      ax.plot([x for x, _ in rows], [_mib(r['saved_bytes']) for _, r in rows],
              ls='--', color=f'C{i}', lw=1,
              label=f'{label}: stored copies (predicted)')
  cap = (results.get('max_batch') or {}).get('cap_bytes')
  if cap and vary == 'batch':
    ax.axhline(_mib(cap), color='grey', ls=':', label='cap')
  ax.set_yscale('log')
  ax.yaxis.set_major_formatter(_plt().matplotlib.ticker.FuncFormatter(
      lambda v, _: f'{v:g}'))
  ax.set_xlabel(xlabel)
  ax.set_ylabel('peak MiB (log)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  _save(fig, path)


def _bar_chart(path, keys, values, ylabel, title, ref=None, fmt='.2f'):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  labels = [SHORT_LABELS.get(k, k) for k in keys]
  bars = ax.bar(labels, values, color=['C%d' % i for i in range(len(keys))])
  for bar, v in zip(bars, values):
    ax.annotate(format(v, fmt), (bar.get_x() + bar.get_width() / 2, v),
                ha='center', va='bottom', fontsize=8)
  if ref is not None:
    ax.axhline(ref, color='grey', ls=':')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.tick_params(axis='x', labelsize=8)
  _save(fig, path)


def _fidelity_chart(results, path):
  plt = _plt()
  fids = _fidelity_runs(results)
  states = ('init', 'trained')
  fig, axes = plt.subplots(len(fids), 2, figsize=(9, 3.2 * len(fids)),
                           sharey=True, squeeze=False)
  for row, (data, fid) in zip(axes, fids):
    for ax, state in zip(row, states):
      if state not in fid['states']:
        ax.set_visible(False)
        continue
      s = fid['states'][state]
      for v, label in VARIANT_LABELS.items():
        if v not in s:
          continue
        cos = np.array(s[v]['layer_cosine'])
        ax.plot(s['layers'], np.maximum(1 - cos, 1e-6), label=label, lw=1)
      ax.axhline(0.01, color='grey', ls=':', label='cosine 0.99')
      ax.set_yscale('log')
      ax.set_title(f'{data}, {state}', fontsize=9)
      ax.grid(alpha=0.3)
    row[0].set_ylabel('1 − cosine (log)')
  for ax in axes[-1]:
    ax.set_xlabel('layer')
  axes[0][0].legend(fontsize=7)
  fid = fids[0][1]
  fig.suptitle(f'gradient vs exact, per layer: ResNet-'
               f'{common.depth(fid["rblocks"])}, batch {fid["batch"]}',
               fontsize=10)
  _save(fig, path)


def charts(results, out_dir):
  """Writes the PNG charts; returns their file names."""
  names = []

  def path(name):
    names.append(name)
    return os.path.join(out_dir, name)

  if results.get('memory', {}).get('runs'):
    _memory_chart(results, path('memory_depth.png'), 'rblocks')
    _memory_chart(results, path('memory_batch.png'), 'batch')
  summary = (results.get('timing') or {}).get('summary')
  if summary:
    keys = [k for k, _, _, _ in common.METHODS if k in summary]
    rblocks, batch = _headline(results)
    _bar_chart(path('time_ratio.png'), keys,
               [summary[k]['time_ratio'] for k in keys],
               f'step time ÷ {common.BASELINE}',
               f'step time, ResNet-{common.depth(rblocks)}, batch {batch}',
               ref=1.0)
  mb = (results.get('max_batch') or {}).get('methods')
  if mb:
    keys = [k for k, _, _, _ in common.METHODS
            if (mb.get(k, {}).get('best') or {}).get('batch')]
    cap = results['max_batch']['cap_bytes']
    _bar_chart(path('max_batch.png'), keys,
               [mb[k]['best']['batch'] for k in keys], 'batch size',
               f'largest batch under {_mib(cap):.0f} MiB, ResNet-'
               f'{common.depth(results["max_batch"]["rblocks"])}', fmt='d')
  if _fidelity_runs(results):
    _fidelity_chart(results, path('grad_fidelity.png'))
  return names


def write(results, out_dir):
  """Writes ``results.md`` and the charts into ``out_dir``."""
  names = charts(results, out_dir)
  text = markdown(results)
  if names:
    text += '\n## Charts\n\n' + '\n'.join(
        f'![{n[:-4]}]({n})' for n in names) + '\n'
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(text)
