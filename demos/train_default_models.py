"""Train the small models shipped in ``mamba_lrp/models/`` (deterministic; CPU, one thread).

    python demos/train_default_models.py                  # all of them, into mamba_lrp/models/
    python demos/train_default_models.py --only mamba-flip-flop --out /tmp/models

Each model is a 2-layer Mamba, H3 or B'MOJO (``d_model`` 64; B'MOJO with chunks of 8 tokens so that
its memory and eidetic tokens are used on these short inputs) trained by
:func:`mamba_lrp.training.train` on a built-in task, and saved with its tokenizer and ``task.json``
(task, options, seed, test accuracy on 2000 test examples). The same seed and thread count give the
same weights on the same machine.

Threads: the script runs on one thread (``torch.set_num_threads(1)``; the CPU scan's numba kernels
follow torch's count). On a shared 2-core machine two OpenMP threads were up to 100 times slower
than one for these tiny tensors, and one thread also makes the run repeat bit for bit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mamba_lrp.tasks import MODELS_DIR, get_task
from mamba_lrp.training import TrainingConfig, build_model, train

#: name -> (task, task options, model config, training settings); the architecture is the name's prefix.
DEFAULT_MODELS: dict[str, tuple[str, dict, dict, dict]] = {
    "mamba-sentiment": ("sentiment", {}, {"d_model": 64, "n_layer": 2}, {"steps": 800}),
    "mamba-flip-flop": ("flip_flop", {}, {"d_model": 64, "n_layer": 2}, {"steps": 500}),
    "mamba-associative-recall": (
        "associative_recall", {}, {"d_model": 64, "n_layer": 2}, {"steps": 8000, "lr": 3e-3},
    ),
    "h3-sentiment": ("sentiment", {}, {"d_model": 64, "n_layer": 2}, {"steps": 2000, "lr": 1e-3}),
    # initializer_range 1/sqrt(d_model): with H3's public 0.02 (made for d_model >= 768) this small
    # model stays on the recall plateau (~32%); see H3Config
    "h3-associative-recall": (
        "associative_recall", {}, {"d_model": 64, "n_layer": 2, "initializer_range": 0.125},
        {"steps": 12000, "lr": 2e-3},
    ),
    "bmojo-sentiment": ("sentiment", {}, {"d_model": 64, "n_layer": 2, "window": 8}, {"steps": 800}),
    "bmojo-associative-recall": (
        "associative_recall", {}, {"d_model": 64, "n_layer": 2, "window": 8}, {"steps": 3000, "lr": 3e-3},
    ),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(DEFAULT_MODELS), help="train only these models")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="parent directory of the model directories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.only or list(DEFAULT_MODELS):
        task_name, task_options, model_config, training = DEFAULT_MODELS[name]
        task = get_task(task_name, **task_options)
        config = TrainingConfig(seed=args.seed, test_examples=2000, **training)
        model = build_model(task, arch=name.split("-", 1)[0], seed=args.seed, **model_config)
        start = time.perf_counter()
        result = train(model, task, config, progress=not args.no_progress, output_dir=args.out / name)
        seconds = time.perf_counter() - start
        size = sum(path.stat().st_size for path in (args.out / name).iterdir() if path.is_file())
        print(f"{name}: test accuracy {result.test_accuracy:.4f} on {result.test_examples} examples, "
              f"final loss {result.losses[-1]:.4f}, {seconds:.0f} s, {size / 1024:.0f} KiB in {args.out / name}")


if __name__ == "__main__":
    main()
