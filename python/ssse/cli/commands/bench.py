"""``ssse bench``: the kernel benchmark (:mod:`ssse_ext.bench`), or with ``--model`` the
real-model benchmark (:mod:`ssse.experiments.model_bench`); the arguments, ``--help``
included, are theirs."""

from __future__ import annotations

__all__ = ["run"]


def run(argv: list[str]) -> int:
    if "--model" in argv:
        from ssse.experiments import model_bench
        return int(model_bench.main([a for a in argv if a != "--model"]) or 0)
    from ssse_ext import bench
    return int(bench.main(argv) or 0)
