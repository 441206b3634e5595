"""The training loop shared by ``cifar/train.py`` and ``imagenet/train.py``.

What it does, in order, for iterations ``start … stop-1``:

* **resume**: if the checkpoint (``-save``) exists, its weights, momentum
  and running BN statistics are loaded and training continues from its
  iteration count; the data pipelines skip to the same position, so a
  resumed run ends with the same weights as an uninterrupted one;
* **train**: one momentum-SGD update per iteration (``split`` sub-batches
  accumulated with ``binit``/``hback``/``cback`` when ``split > 1``);
* **validate** every ``val_every`` iterations and at the end, with batch
  statistics (the reference's mode) and with running statistics;
* **checkpoint** every ``ckpt_every`` iterations and at the end.  A
  checkpoint is first written beside the real one and only moved over it
  once the next forward pass shows a finite loss, so a diverging run never
  replaces the last good checkpoint;
* **stop** on SIGINT/SIGTERM after the current iteration: save, then exit
  with status 128 + signal number (130 for Ctrl-C, 143 for SIGTERM); a
  second Ctrl-C aborts at once (the checkpoint on disk stays intact, since
  writes are atomic);
* **NaN/inf loss**: print the iteration and learning rate and exit with
  status 3 without saving;
* **skipped update** (a finite loss whose gradient, or a learning rate,
  is not finite: the graph keeps weights and momentum and ``backward``
  returns ``False``): log the iteration, count it, go on; the training
  record of that window has ``skipped`` (updates skipped in it), and the
  run ends with a line saying how many of its updates were skipped.

Progress goes to a bar (tqdm when installed and stderr is a terminal) or to
plain lines, to a JSONL log beside the checkpoint (``run.npz`` →
``run.jsonl``; one object per line: ``iter, loss, acc, lr, ips`` (and
``skipped`` when updates were skipped) for training windows, ``iter, val_loss, val_acc, val_loss_running,
val_acc_running`` for validations) and, with ``logdir``, to TensorBoard.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Callable, Optional

import numpy as np

from blpa.data import DataError

EXIT_DATA = 2
EXIT_NAN = 3


def log(message):
  """Prints a time-stamped line (above the progress bar, if one is shown)."""
  line = time.strftime('%Y-%m-%d %H:%M:%S ') + message
  if _BAR[0] is not None:
    _BAR[0].write(line)
  else:
    print(line, flush=True)


_BAR = [None]


def fail(message, status=EXIT_DATA):
  """Prints ``error: message`` to stderr and returns ``status``."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  return status


def guarded(body, args):
  """Runs ``body(args)``; a DataError becomes one ``error:`` line.

  Args:
    body: the program, returning its exit status.
    args: its parsed arguments.

  Returns:
    The exit status (:data:`EXIT_DATA` after a DataError).
  """
  try:
    return body(args)
  except DataError as e:
    return fail(str(e))


# ----------------------------------------------------------------------------
# Learning rate
# ----------------------------------------------------------------------------

def step_schedule(iters, total, steps):
  """A piecewise-constant learning rate with boundaries scaled to a run.

  Args:
    iters: the run's length.
    total: the recipe's length (64000 for CIFAR); boundaries are scaled by
      ``iters / total``.
    steps: list of ``(until, lr)`` in recipe iterations, the last ``until``
      being ``total``.

  Returns:
    Function iteration → learning rate.
  """
  bounds = [int(round(until * iters / total)) for until, _ in steps]
  rates = [lr for _, lr in steps]

  def lr_at(it):
    for bound, lr in zip(bounds, rates):
      if it < bound:
        return lr
    return rates[-1]
  return lr_at


# ----------------------------------------------------------------------------
# Graph construction and steps
# ----------------------------------------------------------------------------

def build_graph(specs, shape, qtype, weight_decay, split=1, ngpu=1, seed=0):
  """Builds the network on one device or, with ``ngpu > 1``, several.

  Several devices, or several workers named by ``TF_CONFIG``, use
  :mod:`blpa.mgraph`; it must then run before any TensorFlow operation.

  Args:
    specs: layer specs (see :mod:`blpa.models`).
    shape: ``[batch, H, W, C]``; ``batch`` is one update's whole batch
      (all sub-batches and devices).
    qtype: 0, 4 or 8.
    weight_decay: on convolution kernels.
    split: sub-batches accumulated per update (``multi``).
    ngpu: devices (per worker).
    seed: seed of the weight initialization.

  Returns:
    A closed graph.

  Raises:
    ValueError, RuntimeError: from :mod:`blpa.mgraph` for devices or a batch
      that cannot be used (named in the message).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from blpa import graph, models  # pylint: disable=import-outside-toplevel
  tf.random.set_seed(seed)
  multi = split if split > 1 else False
  if ngpu <= 1 and not os.environ.get('TF_CONFIG'):
    return models.build(specs, [shape[0] // split] + list(shape[1:]), qtype,
                        weight_decay, multi)
  from blpa import mgraph  # pylint: disable=import-outside-toplevel
  net = mgraph.Graph([graph.SimpleData, [shape]], [graph.LogLoss, []], ngpu)
  for spec in specs:
    net.add(*spec)
  net.close(qtype, weight_decay, multi)
  return net


class StepResult(tuple):
  """``(acc, loss)`` of a training step, with ``applied``: whether the
  update was made (``False`` when the graph skipped it: a non-finite loss,
  gradient or learning rate)."""

  def __new__(cls, acc, loss, applied):
    result = super().__new__(cls, (acc, loss))
    result.applied = applied
    return result


def train_step(net, x, y, lr, split=1):
  """One update on a batch, split into ``split`` interleaved sub-batches.

  Args:
    net: a closed graph (closed with ``multi=split`` when ``split > 1``).
    x: float32 ``[B, H, W, C]``.
    y: int ``[B]``.
    lr: learning rate.
    split: sub-batches (``x[s::split]``, as in the reference).

  Returns:
    A :class:`StepResult`: ``(acc, loss)`` averaged over sub-batches, and
    ``.applied``, False when the update was skipped (not attempted when the
    loss is not finite; skipped by the graph when ``backward``/``cback``
    returns ``False``, e.g. for a non-finite gradient).
  """
  if split <= 1:
    acc, loss = net.forward(x, y)
    if not math.isfinite(loss):
      return StepResult(acc, loss, False)
    return StepResult(acc, loss, net.backward(lr) is not False)
  net.binit()
  accs, losses = [], []
  for s in range(split):
    acc, loss = net.forward(x[s::split], y[s::split])
    accs.append(acc)
    losses.append(loss)
    if not math.isfinite(loss):
      return StepResult(acc, loss, False)
    net.hback()
  applied = net.cback(lr) is not False
  return StepResult(float(np.mean(accs)), float(np.mean(losses)), applied)


def evaluate(net, batches, stop=None):
  """Accuracy and loss with batch and with running BN statistics.

  Args:
    net: a closed graph.
    batches: iterable of ``(x, y)``.
    stop: optional :class:`StopFlag`; evaluation ends early when it is set.

  Returns:
    dict ``val_loss, val_acc, val_loss_running, val_acc_running, images``,
    averages weighted by batch size; None when stopped or no batch came.
  """
  sums = np.zeros(4)
  count = 0
  for x, y in batches:
    if stop is not None and stop.signum:
      return None
    if x is None:
      continue
    acc, loss = net.forward(x, y, train=False)
    racc, rloss = net.forward(x, y, train=False, bn='running')
    sums += len(y) * np.array([loss, acc, rloss, racc])
    count += len(y)
  if not count:
    return None
  keys = ('val_loss', 'val_acc', 'val_loss_running', 'val_acc_running')
  out = {k: float(v) for k, v in zip(keys, sums / count)}
  out['images'] = count
  return out


def describe_eval(result):
  """One line summarizing :func:`evaluate`'s result."""
  return (f'val loss {result["val_loss"]:.4f} acc {result["val_acc"]:.4f} '
          f'(batch stats) | loss {result["val_loss_running"]:.4f} acc '
          f'{result["val_acc_running"]:.4f} (running stats) on '
          f'{result["images"]} images')


def memory_line(net):
  """Stored-activation memory of one batch, compact vs full precision."""
  used = sum(b for _, _, b in net.saved_bytes())
  full = full_bytes(net)
  return (f'stored activations per batch: {used / 2**20:.1f} MiB '
          f'(full precision: {full / 2**20:.1f} MiB, {full / used:.1f}x)')


def full_bytes(net, batch=None):
  """Bytes the layers of ``net`` would keep at full precision (qtype 0)."""
  batch = batch or net.device_batch
  total = 0
  for layer in net.layers:
    h, w, c = layer.in_shape
    total += batch * h * w * 4 * c + 4 * c * int(layer.has_scale)
  return total


# ----------------------------------------------------------------------------
# Signals, progress and logs
# ----------------------------------------------------------------------------

class StopFlag:
  """Turns SIGINT/SIGTERM into a request to stop after this iteration.

  Use as a context manager; ``signum`` is the first signal received (0 if
  none).  A second SIGINT raises KeyboardInterrupt at once.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum = 0
    self._old = {}

  def _handle(self, signum, unused_frame):
    if self.signum and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = self.signum or signum
    log(f'{signal.Signals(signum).name}: stopping after this iteration '
        '(Ctrl-C again aborts without saving)')

  def __enter__(self):
    for sig in self.SIGNALS:
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Progress:
  """Progress bar (tqdm on a terminal) or plain lines every ``every`` steps.

  Args:
    start: first iteration.
    total: last iteration.
    every: iterations between plain lines.
    enabled: False for no progress output at all.
  """

  def __init__(self, start, total, every, enabled=True):
    self.every, self.enabled, self.bar = every, enabled, None
    if enabled and sys.stderr.isatty():
      try:
        import tqdm  # pylint: disable=import-outside-toplevel
        self.bar = tqdm.tqdm(total=total, initial=start, unit='it',
                             dynamic_ncols=True, mininterval=0.5)
      except ImportError:
        pass
    _BAR[0] = self.bar

  def update(self, it, loss, acc, lr, ips):
    """Reports that iteration ``it`` (1-based count) is done."""
    if self.bar is not None:
      self.bar.update(1)
      self.bar.set_postfix(ordered_dict={
          'loss': f'{loss:.3f}', 'acc': f'{acc:.3f}', 'lr': f'{lr:g}',
          'img/s': f'{ips:.0f}'}, refresh=False)
    elif self.enabled and it % self.every == 0:
      log(f'[{it:09d}] lr={lr:.2e}, Train_Loss = {loss:.3e}, Train_Acc = '
          f'{acc:.4f}, {ips:.1f} img/s')

  def close(self):
    """Closes the bar."""
    if self.bar is not None:
      self.bar.close()
    _BAR[0] = None


def log_path(save):
  """The JSONL log beside checkpoint ``save`` (``x.npz`` → ``x.jsonl``)."""
  root = save[:-4] if save.endswith('.npz') else save
  return root + '.jsonl'


class RunLog:
  """Machine-readable log (JSONL) and optional TensorBoard scalars.

  On resume, records past the resumed iteration (left by a run that stopped
  without saving them) are dropped, so the log matches the checkpoint.

  Args:
    path: the JSONL file.
    start: the iteration training resumes at.
    logdir: TensorBoard folder, or None.
  """

  def __init__(self, path, start, logdir=None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        keep = [l for l in f if l.strip() and json.loads(l)['iter'] <= start]
      with open(path, 'w', encoding='utf-8') as f:
        f.writelines(keep)
    self.writer = None
    if logdir:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      self.writer = tf.summary.create_file_writer(logdir)

  def write(self, it, record, prefix):
    """Appends ``record`` (dict of numbers) for iteration ``it``.

    Args:
      it: iteration.
      record: values; written as TensorBoard scalars ``prefix/name`` too.
      prefix: TensorBoard group (``'train'`` or ``'val'``).
    """
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(dict(iter=it, **record)) + '\n')
    if self.writer is not None:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      # tf.summary.scalar needs the tensorboard package; this writes the
      # same event (a float tensor tagged for the scalars plugin) without it.
      meta = tf.compat.v1.SummaryMetadata(
          plugin_data=tf.compat.v1.SummaryMetadata.PluginData(
              plugin_name='scalars'))
      with self.writer.as_default():
        for name, value in record.items():
          tf.summary.write(f'{prefix}/{name}', tf.constant(value, tf.float32),
                           step=it, metadata=meta)
      self.writer.flush()


class Window:
  """Running averages of loss and accuracy, and throughput."""

  def __init__(self):
    self.reset()

  def reset(self):
    """Starts a new window."""
    self.loss = self.acc = 0.0
    self.steps = self.images = self.skipped = 0
    self.since = time.time()

  def add(self, loss, acc, images, applied=True):
    """Adds one iteration (``applied``: whether its update was made)."""
    self.loss += loss
    self.acc += acc
    self.steps += 1
    self.images += images
    self.skipped += not applied

  def record(self, lr):
    """The window's averages as a log record (``skipped``: updates skipped
    in the window, present when there were any)."""
    elapsed = max(time.time() - self.since, 1e-9)
    record = dict(loss=self.loss / self.steps, acc=self.acc / self.steps,
                  lr=lr, ips=self.images / elapsed)
    if self.skipped:
      record['skipped'] = self.skipped
    return record


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
  """Settings of :func:`run`.

  Attributes:
    save: checkpoint path (output and resume point).
    iters: iterations of the whole run (the schedule's length).
    lr: function iteration → learning rate.
    val_every: validate every this many iterations (0: only at the end).
    ckpt_every: checkpoint every this many iterations (0: only at the end).
    log_every: average and log training metrics over this many iterations.
    split: sub-batches per update.
    stop_at: stop (and save) at this iteration, before ``iters``.
    logdir: TensorBoard folder.
    progress: show progress.
  """
  save: str
  iters: int
  lr: Callable[[int], float]
  val_every: int = 0
  ckpt_every: int = 1000
  log_every: int = 10
  split: int = 1
  stop_at: Optional[int] = None
  logdir: Optional[str] = None
  progress: bool = True


def resume(net, path):
  """Loads ``path`` (with training state) if it exists.

  Args:
    net: a closed graph.
    path: checkpoint file.

  Returns:
    The iteration to start at (0 for a new run).

  Raises:
    DataError: when the file cannot be loaded into this network.
  """
  if not os.path.exists(path):
    return 0
  try:
    start = net.load(path)
  except (OSError, ValueError) as e:
    raise DataError(f'cannot resume from {path}: {e}') from None
  log(f'Restored to iteration {start} from {path}')
  return start



def eval_only(net, path, evaluate):
  """Evaluates checkpoint ``path`` (the programs' ``--eval-only``) and logs
  the result; returns the exit status.

  Raises:
    DataError: the checkpoint does not exist.
  """
  if not os.path.exists(path):
    raise DataError(f'--eval-only: checkpoint {path} does not exist')
  niter = resume(net, path)
  log(f'[{niter:09d}] ' + describe_eval(evaluate(net)))
  return 0

def _due(it, every):
  return every > 0 and it % every == 0


class _Loop:
  """State of one call of :func:`run` (see there)."""

  def __init__(self, net, opts, start, evaluate_fn, stop):
    self.net, self.opts, self.start = net, opts, start
    self.evaluate_fn, self.stop = evaluate_fn, stop
    self.end = min(opts.iters, opts.stop_at or opts.iters)
    self.pending = opts.save + '.pending.npz'
    self.log = RunLog(log_path(opts.save), start, opts.logdir)
    self.saved_at = start if os.path.exists(opts.save) else None
    self.skipped = 0  # updates the graph skipped (non-finite gradient)
    if os.path.exists(self.pending):  # left by a run killed mid-iteration
      os.remove(self.pending)

  def diverged(self, it, loss, what='loss'):
    """Reports a non-finite loss and drops the unconfirmed checkpoint."""
    if os.path.exists(self.pending):
      os.remove(self.pending)
    kept = (f'the last good checkpoint {self.opts.save} (iteration '
            f'{self.saved_at}) was kept' if self.saved_at is not None
            else 'no checkpoint was written')
    return fail(f'{what} is {loss} at iteration {it} (lr '
                f'{self.opts.lr(it):g}); stopping without saving: {kept}',
                EXIT_NAN)

  def validate(self, it):
    """Validates; returns an exit status if the result is not finite."""
    result = self.evaluate_fn(self.net, self.stop)
    if result is None:
      return None
    log(f'[{it:09d}] ' + describe_eval(result))
    self.log.write(it, {k: v for k, v in result.items() if k != 'images'},
                   'val')
    if not math.isfinite(result['val_loss']):
      return self.diverged(it, result['val_loss'], 'validation loss')
    return None

  def save(self, it):
    """Writes the checkpoint of iteration ``it`` (after ``it`` updates)."""
    self.net.save(self.opts.save, it, state=True)
    self.saved_at = it
    log(f'Saved iteration {it} to {self.opts.save}')

  def step(self, it, x, y, window, progress):
    """Runs iteration ``it``; returns an exit status when it must stop."""
    if _due(it, self.opts.ckpt_every) and it != self.start:
      self.net.save(self.pending, it, state=True)
    lr = self.opts.lr(it)
    if x is None:
      log(f'[{it:09d}] no readable image in this batch: iteration skipped')
      return None
    result = train_step(self.net, x, y, lr, self.opts.split)
    acc, loss = result
    if not math.isfinite(loss):
      return self.diverged(it, loss)
    if not result.applied:
      self.skipped += 1
      log(f'[{it:09d}] warning: update skipped (loss {loss:.4f} finite, but '
          f'a gradient or the learning rate {lr:g} is not): weights and '
          f'momentum kept; {self.skipped} skipped in this run')
    if os.path.exists(self.pending):
      os.replace(self.pending, self.opts.save)
      self.saved_at = it
      log(f'Saved iteration {it} to {self.opts.save}')
    window.add(loss, acc, len(y), result.applied)
    record = window.record(lr)
    progress.update(it + 1, record['loss'], record['acc'], lr, record['ips'])
    if _due(it + 1, self.opts.log_every):
      self.log.write(it + 1, record, 'train')
      window.reset()
    return None

  def finish(self, it, last):
    """Final check and save once the loop ends at iteration ``it``."""
    if self.skipped:
      log(f'warning: {self.skipped} of {it - self.start} updates of this run '
          'were skipped (non-finite gradient or learning rate)')
    if it == self.opts.iters and not _due(it, self.opts.val_every):
      status = self.validate(it)
      if status is not None:
        return status
    elif last is not None and last[0] is not None:
      acc_loss = self.net.forward(last[0], last[1], train=False)
      if not math.isfinite(acc_loss[1]):
        return self.diverged(it, acc_loss[1])
    if it > self.start or self.saved_at is None:
      self.save(it)
    return 128 + self.stop.signum if self.stop.signum else 0


def run(net, opts, batches, evaluate_fn):
  """Trains ``net`` from its checkpoint (if any) to ``opts.iters``.

  Args:
    net: a closed graph.
    opts: :class:`Options`.
    batches: ``batches(start, stop)`` → iterator of ``(x, y)`` for those
      iterations (``x`` None for an iteration without data).
    evaluate_fn: ``evaluate_fn(net, stop_flag)`` → result of
      :func:`evaluate` or None.

  Returns:
    Exit status: 0 when done (or stopped at ``stop_at``), 128 + signal
    after SIGINT/SIGTERM, :data:`EXIT_NAN` on a non-finite loss.
  """
  start = resume(net, opts.save)
  with StopFlag() as stop:
    loop = _Loop(net, opts, start, evaluate_fn, stop)
    if start >= loop.end:
      log(f'Nothing to do: {opts.save} is at iteration {start}')
      return 0
    progress = Progress(start, loop.end, opts.log_every, opts.progress)
    window, it, last = Window(), start, None
    try:
      for x, y in batches(start, loop.end):
        status = loop.step(it, x, y, window, progress)
        if status is not None:
          return status
        it, last = it + 1, (x, y)
        if _due(it, opts.val_every):
          status = loop.validate(it)
          if status is not None:
            return status
        if stop.signum or it >= loop.end:
          break
    finally:
      progress.close()
    return loop.finish(it, last)


# ----------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------

def add_common_args(parser, iters, val_every):
  """Adds the options both training programs share.

  Args:
    parser: an ``argparse.ArgumentParser``.
    iters: default run length.
    val_every: default validation interval.
  """
  add = parser.add_argument
  add('-save', required=True, help='checkpoint (.npz): written during '
      'training, and resumed from when it exists')
  add('-qtype', type=int, default=0, choices=(0, 4, 8),
      help='bits per stored activation: 0 exact, 4 or 8. Default 0.')
  add('-seed', type=int, default=0, help='seed of the initialization, the '
      'shuffling and the augmentation. Default 0.')
  add('--iters', type=positive, default=iters, help='run length; the learning '
      f'rate schedule scales with it. Default {iters}.')
  add('--val-every', type=int, default=val_every, help='validate every N '
      f'iterations (0: only at the end). Default {val_every}.')
  add('--ckpt-every', type=int, default=1000, help='checkpoint every N '
      'iterations (0: only at the end). Default 1000.')
  add('--log-every', type=positive, default=10, help='average and log training '
      'metrics over N iterations. Default 10.')
  add('--stop-at', type=int, default=None, help='save and stop at this '
      'iteration (the schedule still follows --iters)')
  add('--logdir', default=None, help='write TensorBoard scalars here')
  add('--no-progress', action='store_true', help='no progress output')


def options(args, lr, split=1):
  """:class:`Options` from parsed common arguments.

  Args:
    args: parsed arguments (see :func:`add_common_args`).
    lr: learning-rate function.
    split: sub-batches per update.

  Returns:
    An :class:`Options`.
  """
  return Options(save=args.save, iters=args.iters, lr=lr,
                 val_every=args.val_every, ckpt_every=args.ckpt_every,
                 log_every=args.log_every, split=split, stop_at=args.stop_at,
                 logdir=args.logdir, progress=not args.no_progress)


def positive(text):
  """argparse type: an integer >= 1."""
  value = int(text)
  if value < 1:
    raise ValueError(text)
  return value


def blocks(text):
  """argparse type: four comma-separated block counts, e.g. ``3,8,36,3``."""
  counts = tuple(int(v) for v in text.split(','))
  if len(counts) != 4 or min(counts) < 1:
    raise ValueError(text)
  return counts


def add_imagenet_args(parser):
  """Options of the ImageNet programs: data, image size, network."""
  add = parser.add_argument
  add('--data-dir', default='.', help='folder of the list files; image paths '
      'are relative to it. Default: the current folder.')
  add('--val-list', default='val.txt', help='validation list, relative to '
      '--data-dir. Default val.txt.')
  add('--image-size', type=positive, default=224,
      help='crop size; all scales follow size/224. Default 224.')
  add('--blocks', type=blocks, default=(3, 8, 36, 3),
      help='bottleneck blocks per stage. Default 3,8,36,3 (ResNet-152).')
  add('--classes', type=positive, default=None,
      help='number of classes. Default: largest label + 1 (validate.py: '
      'from the checkpoint).')
