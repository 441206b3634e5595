"""Float → fixed-point conversion demo on scikit-learn's bundled digits.

Trains a small float CNN (conv-conv-pool-dense-dense) on the 8x8 digits,
then for each word length: proposes formats from one training batch
(:func:`blpa.fixedpoint.propose_formats`), converts
(:func:`blpa.fixedpoint.convert`), reports test accuracy before and after
fine-tuning (Adam, fixed learning rate, no weight decay, as the reference)
and the per-layer activation sparsity (share of exact zeros after the ReLU),
float against fixed point. Writes ``fixedpoint_table.md``,
``fixedpoint_results.json`` and ``accuracy_vs_bits.png`` to ``--out``.

    python -m blpa.fixedpoint.demo --out fixedpoint_demo
"""

import argparse
import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from blpa import fixedpoint as fx


def load_digits(train_size, seed):
  """``(x_train, y_train, x_test, y_test)``, images in [0, 1] ``[N,8,8,1]``."""
  # pylint: disable-next=import-outside-toplevel
  from sklearn.datasets import load_digits as sk_digits
  digits = sk_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  return x[:train_size], y[:train_size], x[train_size:], y[train_size:]


def float_model(filters):
  """The float CNN; the last Dense gives logits."""
  return keras.Sequential([
      keras.Input((8, 8, 1)),
      keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                          name="conv1"),
      keras.layers.Conv2D(2 * filters, 3, padding="same", activation="relu",
                          name="conv2"),
      keras.layers.MaxPooling2D(2, name="pool"),
      keras.layers.Flatten(name="flatten"),
      keras.layers.Dense(64, activation="relu", name="fc1"),
      keras.layers.Dense(10, name="logits"),
  ], name="digits_cnn")


def _compile(model, lr):
  model.compile(keras.optimizers.Adam(lr),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def accuracy(model, x, y, batch=512):
  """Top-1 accuracy of the logits."""
  hits = 0
  for start in range(0, len(x), batch):
    logits = model(x[start:start + batch])
    hits += int(np.sum(np.argmax(logits, axis=-1) == y[start:start + batch]))
  return hits / len(x)


def _format_text(formats):
  """``conv1 w Q3.13 a Q4.12; ...`` for the table."""
  parts = []
  for name, f in formats.items():
    text = f"{name} w Q{f['weight'][0]}.{f['weight'][1]}"
    if f["activation"] is not None:
      text += f" a Q{f['activation'][0]}.{f['activation'][1]}"
    parts.append(text)
  return "; ".join(parts)


def convert_and_finetune(model, data, bits, args):
  """One row of the table: formats, accuracies, sparsity."""
  x_train, y_train, x_test, y_test = data
  formats = fx.propose_formats(model, x_train[:args.batch * 8], bits=bits)
  twin = fx.convert(model, formats, rounding=args.rounding, seed=args.seed)
  row = {"bits": bits, "formats": {k: {"weight": list(v["weight"]),
                                       "activation": v["activation"] and
                                       list(v["activation"])}
                                   for k, v in formats.items()},
         "acc_before": accuracy(twin, x_test, y_test),
         "sparsity": fx.activation_sparsity(twin, x_test)}
  _compile(twin, args.finetune_lr)
  twin.fit(x_train, y_train, batch_size=args.batch,
           epochs=args.finetune_epochs, verbose=0)
  row["acc_after"] = accuracy(twin, x_test, y_test)
  row["sparsity_after"] = fx.activation_sparsity(twin, x_test)
  return row, _format_text(formats)


def table(result):
  """The Markdown table of a result."""
  layers = list(result["float_sparsity"])
  head = (["word bits", "acc. before fine-tuning", "acc. after"] +
          [f"zeros {name} (float {100 * result['float_sparsity'][name]:.1f}%)"
           for name in layers])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
           "| float32 | " + f"{result['float_acc']:.4f} | – | " +
           " | ".join(f"{100 * result['float_sparsity'][n]:.1f}%"
                      for n in layers) + " |"]
  for r in result["rows"]:
    cells = [str(r["bits"]), f"{r['acc_before']:.4f}", f"{r['acc_after']:.4f}"]
    cells += [f"{100 * r['sparsity'][n]:.1f}% "
              f"({100 * (r['sparsity'][n] / result['float_sparsity'][n] - 1):+.0f}%)"
              for n in layers]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Formats (w: weights, a: activation rounding before the ReLU):",
            ""] + [f"- {r['bits']} bits: {r['format_text']}"
                   for r in result["rows"]]
  return "\n".join(lines)


def plot(result, path):
  """Accuracy against word length, before and after fine-tuning."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = sorted(result["rows"], key=lambda r: r["bits"])
  bits = [r["bits"] for r in rows]
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax.plot(bits, [r["acc_before"] for r in rows], "o-",
          label="fixed point, before fine-tuning")
  ax.plot(bits, [r["acc_after"] for r in rows], "s-",
          label=f"after {result['config']['finetune_epochs']} epoch(s) "
          "fine-tuning")
  ax.axhline(result["float_acc"], color="grey", ls=":", label="float32")
  ax.set_xlabel("word length (bits)")
  ax.set_ylabel("test accuracy")
  ax.set_xticks(bits)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  layers = list(result["float_sparsity"])
  width = 0.8 / (len(rows) + 1)
  pos = np.arange(len(layers))
  bx.bar(pos, [result["float_sparsity"][n] for n in layers], width,
         label="float32", color="grey")
  for i, r in enumerate(rows):
    bx.bar(pos + (i + 1) * width, [r["sparsity"][n] for n in layers], width,
           label=f"{r['bits']} bits")
  bx.set_xticks(pos + 0.4 - width / 2)
  bx.set_xticklabels(layers)
  bx.set_ylabel("share of zero activations")
  bx.set_ylim(0, 1)
  bx.legend(fontsize=7, ncol=4, loc="upper center")
  fig.suptitle("digits CNN: float → fixed point (test set)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="fixedpoint_demo")
  parser.add_argument("--bits", type=int, nargs="+", default=[16, 8, 6, 5, 4, 3])
  parser.add_argument("--epochs", type=int, default=30)
  parser.add_argument("--finetune-epochs", type=int, default=3)
  parser.add_argument("--finetune-lr", type=float, default=2e-5)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--filters", type=int, default=16)
  parser.add_argument("--train-size", type=int, default=1400)
  parser.add_argument("--rounding", default="deterministic",
                      choices=["deterministic", "stochastic"])
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  start = time.time()
  keras.utils.set_random_seed(args.seed)
  data = load_digits(args.train_size, args.seed)
  x_train, y_train, x_test, y_test = data
  model = float_model(args.filters)
  _compile(model, args.lr)
  model.fit(x_train, y_train, batch_size=args.batch, epochs=args.epochs,
            verbose=0)
  result = {"config": vars(args), "train": len(x_train), "test": len(x_test),
            "float_acc": accuracy(model, x_test, y_test),
            "float_sparsity": fx.activation_sparsity(model, x_test),
            "rows": []}
  for bits in args.bits:
    row, text = convert_and_finetune(model, data, bits, args)
    row["format_text"] = text
    result["rows"].append(row)
    print(f"{bits:2d} bits: acc {row['acc_before']:.4f} -> "
          f"{row['acc_after']:.4f} after fine-tuning ({text})", flush=True)
  result["seconds"] = time.time() - start
  os.makedirs(args.out, exist_ok=True)
  md = table(result)
  with open(os.path.join(args.out, "fixedpoint_table.md"), "w") as f:
    f.write(md + "\n")
  with open(os.path.join(args.out, "fixedpoint_results.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, "accuracy_vs_bits.png"))
  print(f"float32 test accuracy {result['float_acc']:.4f} "
        f"({len(x_test)} test images); {result['seconds']:.0f} s")
  print(md)
  return result


if __name__ == "__main__":
  tf.get_logger().setLevel("ERROR")
  main()
