"""``ssse train``: train the experiments' model for a data set and save it."""

from __future__ import annotations

import time

from ssse import metrics

from ..common import dtype, out_path

__all__ = ["run"]


def run(args) -> int:
    from ssse.experiments.tasks import make_task
    from ssse.io import save_model

    task = make_task(args.data, model=args.model, data_dir=args.data_dir, seed=args.seed,
                     train_limit=args.train_limit, device=args.device, dtype=dtype(args),
                     weight_decay=args.weight_decay, epochs=args.epochs)
    t0 = time.perf_counter()
    model = task.train(task.data(), seed=args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    path = save_model(out_path(args, "model.safetensors"), model, spec=task.spec,
                      **task.metadata(seed=args.seed, train_seconds=seconds))

    def accuracy(data):
        return metrics.accuracy(metrics.predict(model, data), data[1])

    print(f"trained {task.spec['arch']} on {task.ds.name} (n={task.n}) in {seconds:.2f} s: "
          f"train accuracy {accuracy(task.ds.train()):.4f}, "
          f"test accuracy {accuracy(task.ds.test()):.4f}")
    print(path)
    return 0
