"""The paper's experiments at this machine's scale, beside exact training.

Usage::

    python -m blpa.approx.experiments                 # ~21 min on 2 cores
    python -m blpa.approx.experiments --quick         # a smoke run

For each network (the 64-500-500-10 MLP on scikit-learn's bundled digits,
for each of ``--mlp-seeds``; a WRN-16-4 for 8 epochs, for each of
``--seeds``, and a WRN-10-2 for 10 epochs, on the digits upsampled to
32×32×3) the exact model and its copies (topk, forward mode; the layer
that reads the input and the last dense layer exact, ``skip='ends'``)
start from the same weights (initialized with that seed) and train in
lockstep on the same batches (the same test split for every seed) with the
same schedule (SGD, momentum 0.9, cosine learning rate). The WRNs' copies
sample at ratios 0.5 and 0.33 and train the final ``--exact-tail`` share
of the steps exactly (:mod:`blpa.approx.phases`); the WRN-10-2 also has a
ratio-0.5 copy that samples to the end. The MLP's copies sample to the end
at 0.5 and 0.33, and two more sample all three layers (the paper's MNIST
choice) at 0.5, one of them with the exact tail. Each step runs the models
in rotating order, so that the wall times per step (medians) are measured
side by side.
Reported: multiply-adds per sampled step and over the schedule (counted per
product actually run, :mod:`blpa.approx.macs`), median sampled step time,
its speed-up and the whole schedule's (each phase's median against the
exact model's steps in the same window), final test
accuracy (exact evaluation, after the BN statistics are recomputed from 20
exact training batches; the raw accuracy too), and for the first ratio-0.5
copy which channels it selected (:mod:`blpa.approx.selection`); a summary
table gives each network's mean over its seeds and the gaps to exact
training paired by seed. A subprocess
on 2 logical CPU devices measures the all-reduce buffer of the WRN-16-4 at
ratio 1/3 with ``weight_topk``, full against compressed, and checks that
both give the same gradients.

Writes ``approx.md``, ``approx.json`` and ``approx.png`` (accuracy against
multiply-adds) to ``--out`` (default ``bench/results``).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

__all__ = ["main"]

RATIOS = (1.0, 0.5, 0.33)
EXACT_TAIL = 0.2  # share of final steps trained exactly (docs/approx.md)


def digits(image_size=None, seed=0):
  """scikit-learn's bundled digits, split 80/20 with a fixed permutation.

  Args:
    image_size: None for the 64 features scaled to [0, 1]; an int for
      images upsampled (bilinear) to image_size² × 3 channels.
    seed: permutation seed.

  Returns:
    ``(x_train, y_train, x_test, y_test)`` as numpy arrays.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  if image_size:
    img = tf.image.resize(x.reshape(-1, 8, 8, 1), [image_size, image_size])
    x = np.repeat((img.numpy() - 0.3) / 0.4, 3, axis=-1)
  order = np.random.default_rng(seed).permutation(len(y))
  x, y = x[order], y[order]
  cut = int(0.8 * len(y))
  return x[:cut], y[:cut], x[cut:], y[cut:]


class _Trainer:
  """A model, its optimizer and compiled training steps (sampled, exact)."""

  def __init__(self, model, learning_rate):
    import keras  # pylint: disable=import-outside-toplevel
    self.model = model
    self.optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    self.loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)
    self.step = self._make_step()
    self.exact_step = None
    self.times = []
    self.exact_times = []
    self.exact_from = None
    self.recorder = None

  def _make_step(self):
    """A new ``tf.function`` training step (traced at its first call)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    model = self.model

    @tf.function
    def step(x, y):
      with tf.GradientTape() as tape:
        loss = self.loss_fn(y, model(x, training=True))
      grads = tape.gradient(loss, model.trainable_variables)
      self.optimizer.apply_gradients(zip(grads, model.trainable_variables))
      return loss

    return step

  def timed_step(self, x, y, exact=False):
    """One training step; exact=True runs the sampled layers exactly."""
    from blpa.approx.calibrate import exact_layers  # pylint: disable=import-outside-toplevel
    if not exact:
      if self.recorder is not None and len(self.times) % 2 == 0:
        self.recorder.record(x)
      return self._timed(self.step, x, y, self.times)
    if self.exact_step is None:
      self.exact_step = self._make_step()
    with exact_layers(self.model):
      return self._timed(self.exact_step, x, y, self.exact_times)

  @staticmethod
  def _timed(step, x, y, times):
    start = time.perf_counter()
    loss = float(step(x, y))
    times.append(time.perf_counter() - start)
    return loss

  def accuracy(self, x, y):
    """Accuracy of an eager exact evaluation."""
    return float(np.mean(np.argmax(self.model(x, training=False).numpy(), 1)
                         == y))


def _cosine(lr, total):
  import keras  # pylint: disable=import-outside-toplevel
  return keras.optimizers.schedules.CosineDecay(lr, total)


def _train_lockstep(trainers, x_train, y_train, epochs, batch, rng):
  """One step of every trainer per batch, in rotating order.

  A trainer whose ``exact_from`` is set runs its steps from that index on
  with exact products.

  Returns:
    ``(last losses, number of batches)``.
  """
  losses = np.zeros(len(trainers))
  count = 0
  for _ in range(epochs):
    order = rng.permutation(len(y_train))
    for start in range(0, len(order) - batch + 1, batch):
      idx = order[start:start + batch]
      shift = count % len(trainers)
      for i in list(range(shift, len(trainers))) + list(range(shift)):
        exact = trainers[i].exact_from is not None and \
            count >= trainers[i].exact_from
        losses[i] = trainers[i].timed_step(x_train[idx], y_train[idx], exact)
      count += 1
  return losses, count


def _median(times, drop):
  """Median of times after the first ``drop`` (tracing) calls, if any are
  left (else of all; None when there are none)."""
  kept = times[drop:] or times
  return float(np.median(kept)) if kept else None


def _timing(trainer, exact_times):
  """Median sampled step, its speed-up, and the whole schedule's speed-up.

  Each phase (sampled steps, then exact-tail steps) is timed against the
  exact model's steps of the same window, run interleaved with it: the
  schedule's time is the number of steps of each phase times its median.

  Args:
    trainer: the sampled model's trainer.
    exact_times: the exact model's step times, one per step.

  Returns:
    dict of medians (s), speed-ups and the number of exact-tail steps.
  """
  sampled = len(trainer.times)
  tail = len(trainer.exact_times)
  step_time = _median(trainer.times, 2)
  exact_sampled = _median(exact_times[:sampled], 2)
  exact_tail = _median(exact_times[sampled:], 0)
  tail_time = _median(trainer.exact_times, 1)
  exact_total = sampled * exact_sampled + tail * (exact_tail or 0.0)
  total = sampled * step_time + tail * (tail_time or 0.0)
  return dict(step_time_s=step_time, exact_step_time_s=exact_sampled,
              speedup=exact_sampled / step_time, exact_tail_steps=tail,
              tail_step_time_s=tail_time, exact_tail_window_s=exact_tail,
              schedule_speedup=exact_total / total)


def compare(name, build, data, epochs, batch, lr, skip, arms=None, seed=0,
            calib=20, sampler="topk", track_ratio=0.5):
  """Trains the exact model and its sampled copies in lockstep.

  Args:
    name: the experiment's name.
    build: ``() -> keras.Model``, the exact network.
    data: ``(x_train, y_train, x_test, y_test)``.
    epochs: training epochs.
    batch: batch size (the last partial batch is dropped).
    lr: peak learning rate (cosine decay to 0).
    skip: ``skip`` argument of :func:`blpa.approx.approximate`.
    arms: ``(sample_ratio, exact_tail)`` pairs: the copies trained, each
      sampling at its ratio except for the final ``exact_tail`` share of the
      steps (:mod:`blpa.approx.phases`); ratio 1 is the exact model itself.
      A third item overrides ``skip`` for that copy (its label then names
      it). Default: ratios 1, 0.5, 0.33 without a tail.
    seed: seed of the batch order, of the samplers and of Keras's global
      random state (initializers without a seed of their own; ``build``
      passes its seed to those that have one).
    calib: training batches of exact forward passes that set the BN
      statistics before the (exact) test evaluation, for every arm.
    sampler: the sampler of the approximate copies (forward mode).
    track_ratio: the first arm at this ratio records which channels it
      selects (:class:`blpa.approx.selection.SelectionRecorder`, every
      second sampled step); None records nothing.

  Returns:
    A list of result dicts, one per arm.
  """
  import keras  # pylint: disable=import-outside-toplevel
  from blpa.approx import approximate, macs, phases  # pylint: disable=import-outside-toplevel
  from blpa.approx.calibrate import recalibrate_batch_norm  # pylint: disable=import-outside-toplevel
  from blpa.approx.selection import SelectionRecorder  # pylint: disable=import-outside-toplevel
  arms = arms or [(r, 0.0) for r in RATIOS]
  x_train, y_train, x_test, y_test = data
  keras.utils.set_random_seed(seed)
  base = build()
  steps = epochs * (len(y_train) // batch)
  trainers = []
  for ratio, tail, *own_skip in arms:
    layers = own_skip[0] if own_skip else skip
    model = base if ratio == 1.0 else approximate(base, ratio, skip=layers,
                                                  sampler=sampler, seed=seed)
    trainer = _Trainer(model, _cosine(lr, steps))
    if ratio < 1.0:
      trainer.exact_from = steps - phases.exact_steps(steps, tail)
      if ratio == track_ratio and sampler in ("topk", "weight_topk") and \
          not any(t.recorder for t in trainers):
        trainer.recorder = SelectionRecorder(model)
    trainers.append(trainer)
  losses, count = _train_lockstep(trainers, x_train, y_train, epochs, batch,
                                  np.random.default_rng(seed))
  exact_macs = macs.training_macs(base, batch)["total"]
  rows = []
  for (ratio, tail, *own_skip), trainer, loss in zip(arms, trainers, losses):
    raw = trainer.accuracy(x_test, y_test)
    recalibrate_batch_norm(trainer.model, [x_train[i:i + batch] for i in
                                           range(0, calib * batch, batch)])
    step_macs = macs.training_macs(trainer.model, batch)["total"]
    saved = 1 - step_macs / exact_macs
    row = dict(
        experiment=name, ratio=ratio, exact_tail=tail if ratio < 1 else 0.0,
        sampler=sampler if ratio < 1 else "exact", steps=count, batch=batch,
        macs_per_step=int(step_macs), macs_saved=saved,
        schedule_macs_saved=saved * (1 - phases.exact_steps(steps, tail) /
                                     steps) if ratio < 1 else 0.0,
        final_loss=float(loss), test_accuracy_raw=raw,
        test_accuracy=trainer.accuracy(x_test, y_test),
        calibration_batches=calib,
        exact_layers=_skip_label(own_skip[0]) if own_skip else None)
    row.update(_timing(trainer, trainers[0].times))
    if trainer.recorder is not None:
      row["selection"] = trainer.recorder.summary()
    rows.append(row)
  return rows


def communication(depth=16, width=4, ratio=1 / 3, batch=8):
  """All-reduce bytes per step, full vs compressed, on 2 logical devices.

  Must run in a fresh process (it configures the logical devices).

  Returns:
    dict with the bytes of both buffers, the saving, and whether the two
    all-reduces gave bit-identical gradients on two steps.
  """
  import keras  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from blpa.approx import approximate, nets  # pylint: disable=import-outside-toplevel
  from blpa.approx import distributed  # pylint: disable=import-outside-toplevel
  strategy = distributed.logical_cpu_strategy(2)
  keras.utils.set_random_seed(0)
  with strategy.scope():
    model = approximate(nets.wide_resnet(depth, width), ratio,
                        sampler="weight_topk")
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    optimizer.build(model.trainable_variables)
  full = distributed.CompressedAllReduce(model, compressed=False)
  compressed = distributed.CompressedAllReduce(model)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction="sum")

  def replica_step(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True)) / (2 * batch)
    grads = tape.gradient(loss, model.trainable_variables)
    return full.all_reduce(grads), compressed.apply_gradients(optimizer,
                                                             grads)

  @tf.function
  def step(x, y):
    return strategy.run(replica_step, (x, y))

  x_train, y_train, _, _ = digits(32)
  same = True
  for i in range(2):
    chunk = slice(2 * batch * i, 2 * batch * (i + 1))
    xs, ys = x_train[chunk], y_train[chunk]
    dist_x = strategy.experimental_distribute_values_from_function(
        lambda ctx: xs[ctx.replica_id_in_sync_group::2])
    dist_y = strategy.experimental_distribute_values_from_function(
        lambda ctx: ys[ctx.replica_id_in_sync_group::2])
    want, got = step(dist_x, dist_y)
    same &= all(np.array_equal(a.numpy(), b.numpy())
                for w, g in zip(want, got)
                for a, b in zip(strategy.experimental_local_results(w),
                                strategy.experimental_local_results(g)))
  return dict(network=f"WRN-{depth}-{width}", ratio=ratio,
              full_bytes=full.bytes_per_step(),
              compressed_bytes=compressed.bytes_per_step(),
              saved=1 - compressed.bytes_per_step() / full.bytes_per_step(),
              bit_identical=bool(same))


def _communication_subprocess(args):
  """Runs :func:`communication` in a fresh process and returns its dict."""
  cmd = [sys.executable, "-m", "blpa.approx.experiments", "--comm-only",
         "--depth", str(args.depth), "--width", str(args.width)]
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep +
             os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False, timeout=900)
  if proc.returncode != 0:
    raise RuntimeError(f"communication run failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _skip_label(skip):
  """How an arm's own ``skip`` reads in its label."""
  if skip == "ends":
    return "ends exact"
  return ", ".join(sorted(skip)) + " exact" if skip else "all layers sampled"


def _arm(r):
  """The arm's label: its ratio, its own exact layers if it has them, and
  its exact tail if it has one."""
  layers = f", {r['exact_layers']}" if r.get("exact_layers") else ""
  tail = f", exact last {100 * r['exact_tail']:g}%" if r["exact_tail"] else ""
  return f"{r['ratio']:g}{layers}{tail}"


def _table(rows):
  lines = ["| experiment | ratio | GMACs/sampled step | MACs saved (step / "
           "schedule) | step (ms) | speed-up (step / schedule) | test acc. "
           "(BN recal.) | test acc. (raw) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['experiment']} | {_arm(r)} | {r['macs_per_step'] / 1e9:.3f}"
        f" | {100 * r['macs_saved']:.1f}% / "
        f"{100 * r['schedule_macs_saved']:.1f}% | "
        f"{1e3 * r['step_time_s']:.1f} | {r['speedup']:.2f}× / "
        f"{r['schedule_speedup']:.2f}× | {100 * r['test_accuracy']:.1f}% | "
        f"{100 * r['test_accuracy_raw']:.1f}% |")
  return lines


def _network(row):
  """The experiment's name without its seed."""
  return row["experiment"].split(", seed ")[0]


def _summary_table(rows):
  """Each network and arm over its seeds: means, and the accuracy gaps to
  the exact model of the same seed."""
  lines = ["| network | ratio | seeds | test acc., mean (exact) | gap to exact"
           ", mean (min to max) | seeds within 1 pt | MACs saved (step / "
           "schedule) | speed-up, mean (step / schedule) |",
           "|---|---|---|---|---|---|---|---|"]
  exact = {r["experiment"]: r["test_accuracy"] for r in rows
           if r["ratio"] == 1.0}
  arms = {}
  for r in rows:
    if r["ratio"] < 1.0:
      arms.setdefault((_network(r), _arm(r)), []).append(r)
  for (network, arm), sub in arms.items():
    gaps = [100 * (exact[r["experiment"]] - r["test_accuracy"]) for r in sub]
    mean = lambda key: float(np.mean([r[key] for r in sub]))
    lines.append(
        f"| {network} | {arm} | {len(sub)} | {100 * mean('test_accuracy'):.2f}"
        f"% ({np.mean([exact[r['experiment']] for r in sub]) * 100:.2f}%) | "
        f"{np.mean(gaps):.2f} pt ({min(gaps):.2f} to {max(gaps):.2f}) | "
        f"{sum(g <= 1.0 for g in gaps)} of {len(gaps)} | "
        f"{100 * mean('macs_saved'):.1f}% / "
        f"{100 * mean('schedule_macs_saved'):.1f}% | "
        f"{mean('speedup'):.2f}× / {mean('schedule_speedup'):.2f}× |")
  return lines


def _selection_table(rows):
  """Rich get richer: how concentrated the selected channels are."""
  lines = ["| experiment | ratio | steps recorded | Gini (same k always) | "
           "entropy / log n (same k always) | never selected | selections to the k most "
           "selected | kernel-slice norm growth, k most / others | kernel-slice "
           "change ‖ΔW‖/‖W₀‖, k most / others |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "selection" not in r:
      continue
    m = r["selection"]["mean"]
    lines.append(
        f"| {r['experiment']} | {_arm(r)} | {r['selection']['steps']} | "
        f"{m['gini']:.2f} ({m['gini_fixed_set']:.2f}) | {m['entropy']:.3f} "
        f"({m['entropy_fixed_set']:.3f}) | "
        f"{100 * m['never']:.1f}% | {100 * m['top_k_share']:.1f}% | "
        f"{m['norm_growth_often']:.2f}× / {m['norm_growth_rare']:.2f}× | "
        f"{m['change_often']:.3f} / {m['change_rare']:.3f} |")
  return lines


def _plot(rows, path):
  """Accuracy against multiply-adds per step, one panel per network: each
  seed's runs as dots, each arm's mean over the seeds with its range."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = sorted({_network(r) for r in rows})
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
  gmacs = lambda r: (r["macs_per_step"] / 1e9 * (1 - r["schedule_macs_saved"])
                     / (1 - r["macs_saved"]))
  for ax, name in zip(np.atleast_1d(axes), names):
    arms = {}
    for r in rows:
      if _network(r) == name:
        arms.setdefault(_arm(r), []).append(r)
    for arm, sub in arms.items():
      acc = [100 * r["test_accuracy"] for r in sub]
      x = float(np.mean([gmacs(r) for r in sub]))
      ax.plot([gmacs(r) for r in sub], acc, ".", color="0.6")
      mean = float(np.mean(acc))
      ax.errorbar([x], [mean], yerr=[[mean - min(acc)], [max(acc) - mean]],
                  fmt="o", capsize=3)
      ax.annotate(f"r={arm}", (x, mean), fontsize=7, xytext=(4, 4),
                  textcoords="offset points")
    seeds = len(next(iter(arms.values())))
    ax.set_xlabel("GMACs per training step, schedule average")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(name + (f" ({seeds} seeds: mean, range, runs)"
                         if seeds > 1 else ""), fontsize=9)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(result, out):
  """Writes approx.md, approx.json and approx.png to the folder out."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "approx.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  comm = result["communication"]
  lines = ["# blpa.approx: sampled training beside exact training", "",
           f"Command: `{result['command']}`; {result['setup']}", "",
           "Summary over seeds (gaps in accuracy points, each sampled copy "
           "against the exact model of its seed):", ""]
  lines += _summary_table(result["rows"]) + ["", "Every run:", ""]
  lines += _table(result["rows"])
  lines += ["", f"All-reduce per step, {comm['network']} at ratio "
            f"{comm['ratio']:.3g} (weight_topk, 2 logical CPU devices): full "
            f"{comm['full_bytes'] / 1e6:.2f} MB, compressed "
            f"{comm['compressed_bytes'] / 1e6:.2f} MB "
            f"({100 * comm['saved']:.1f}% less); gradients bit-identical: "
            f"{comm['bit_identical']}.", "",
            "![accuracy against multiply-adds](approx.png)", "",
            "Rich get richer: which input channels topk forward sampling "
            "selected (mean over the sampled layers; recorded every second "
            "sampled step; Gini 0 and entropy 1 are an even rotation, the "
            "values in brackets those of always keeping the same k "
            "channels).", ""]
  lines += _selection_table(result["rows"]) + [""]
  with open(os.path.join(out, "approx.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  _plot(result["rows"], os.path.join(out, "approx.png"))


def _parser():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join("bench", "results"))
  parser.add_argument("--mlp-epochs", type=int, default=60)
  parser.add_argument("--mlp-seeds", type=int, nargs="+",
                      default=list(range(8)),
                      help="seeds (weights, batch order) of the MLP "
                      "comparison, one comparison each")
  parser.add_argument("--wrn-epochs", type=int, default=8)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                      help="seeds (weights, batch order) of the main WRN "
                      "comparison, one comparison each")
  parser.add_argument("--small-epochs", type=int, default=10,
                      help="epochs of the longer WRN-10-2 accuracy run")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--depth", type=int, default=16)
  parser.add_argument("--width", type=int, default=4)
  parser.add_argument("--exact-tail", type=float, default=EXACT_TAIL,
                      help="share of the final steps that the sampled "
                      "models train exactly (blpa.approx.phases)")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run: tiny WRN, one epoch each")
  parser.add_argument("--comm-only", action="store_true",
                      help=argparse.SUPPRESS)
  return parser


def _seeded(name, seed, seeds):
  """The experiment's name, with its seed where there are several."""
  return name + (f", seed {seed}" if len(seeds) > 1 else "")


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.comm_only:
    print(json.dumps(communication(args.depth, args.width)))
    return 0
  if args.quick:
    args.mlp_epochs, args.wrn_epochs, args.small_epochs = 1, 1, 1
    args.depth, args.width = 10, 1
    args.mlp_seeds, args.seeds = args.mlp_seeds[:2], args.seeds[:1]
  from blpa.approx import nets  # pylint: disable=import-outside-toplevel
  load = os.getloadavg()[0]
  started = time.time()
  tail = args.exact_tail
  with_plain = [(1.0, 0.0), (0.5, 0.0), (0.5, tail), (0.33, tail)]
  mlp_arms = [(1.0, 0.0), (0.5, 0.0), (0.33, 0.0), (0.5, 0.0, None),
              (0.5, tail, None)]
  rows = []
  mlp = "MLP 64-500-500-10, digits"
  for seed in args.mlp_seeds:
    rows += compare(_seeded(mlp, seed, args.mlp_seeds),
                    lambda: nets.mlp(seed=seed), digits(), args.mlp_epochs,
                    64, 0.05, skip="ends", arms=mlp_arms, seed=seed,
                    track_ratio=0.5 if seed == args.mlp_seeds[0] else None)
  images = digits(32)
  wrn = f"WRN-{args.depth}-{args.width}, {args.wrn_epochs} epochs"
  for seed in args.seeds:
    rows += compare(_seeded(wrn, seed, args.seeds),
                    lambda: nets.wide_resnet(args.depth, args.width,
                                             seed=seed), images,
                    args.wrn_epochs, args.batch, 0.05, skip="ends",
                    arms=[(1.0, 0.0), (0.5, tail), (0.33, tail)], seed=seed,
                    track_ratio=0.5 if seed == args.seeds[0] else None)
  small = f"WRN-10-2, {args.small_epochs} epochs"
  rows += compare(small, lambda: nets.wide_resnet(10, 2), images,
                  args.small_epochs, args.batch, 0.05, skip="ends",
                  arms=with_plain)
  comm = _communication_subprocess(args)
  result = dict(
      command=" ".join(["python -m blpa.approx.experiments"] + list(
          argv if argv is not None else sys.argv[1:])),
      setup=(f"MLP {args.mlp_epochs} epochs batch 64, WRNs batch "
             f"{args.batch}; images: the digits upsampled to 32×32×3; topk "
             "forward sampling; the first Conv2D (the MLP: the first Dense) "
             "and the last Dense exact unless the arm says otherwise; SGD "
             "momentum 0.9, cosine learning rate from "
             "0.05; 'exact last N%': the sampled model trains its final N% "
             "of steps exactly; step = median sampled step, schedule = the "
             "whole run, each phase (sampled, exact tail) at its median "
             "against the exact model's steps of the same window; BN "
             "statistics recalibrated with 20 exact training batches "
             "before the exact test evaluation; TF "
             f"oneDNN={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}; "
             f"load average {load:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end (shared machine); "
             f"{time.time() - started:.0f} s in all"),
      rows=rows, communication=comm)
  write_results(result, args.out)
  print("\n".join(_summary_table(rows)))
  print(json.dumps(comm))
  return 0


if __name__ == "__main__":
  sys.exit(main())
