"""Assertions shared by the QADG tests (they live in :mod:`geta_fx.testing`)."""

import copy
import os
import subprocess
import sys

import torch

from geta_fx.testing import max_rel_err, num_params, tensor_leaves, zero_random_units

__all__ = ["max_rel_err", "num_params", "tensor_leaves", "zero_eager", "zero_random_units"]


def zero_eager(model: torch.nn.Module, gm: torch.nn.Module) -> torch.nn.Module:
    """A copy of the user's eager ``model`` holding ``gm``'s (zeroed) parameters: the oracle a
    compressed model is checked against (parameters matched by name)."""
    ref = copy.deepcopy(model)
    params = dict(gm.graph_module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in ref.named_parameters(remove_duplicate=False):
            p.copy_(params[name])
    return ref


def run_benchmark(script: str, *args: str, cwd: object) -> str:
    """stdout of ``python benchmarks/<script> *args`` run from ``cwd`` (warnings off); a
    non-zero exit fails the test with the script's stderr."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def run_ranks(worker: object, args: tuple, world: int, results: list[str],
              start_method: str = "fork") -> None:
    """Run ``worker(rank, *args)`` on ``world`` processes and wait for them.

    gloo's teardown can abort a rank ("terminate called without an active exception", seen
    about once in 20 runs on a 2-core machine) after every collective finished.  Each worker
    writes its result file only after its checks passed, so a crash before that still fails
    here; one after it (every file in ``results`` exists) is reported as a warning.
    """
    import warnings

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    try:
        mp.start_processes(worker, args=args, nprocs=world, join=True,
                           start_method=start_method)
    except ProcessExitedException as e:
        if not all(os.path.isfile(f) for f in results):
            raise
        warnings.warn(f"a worker crashed while shutting down after finishing: {e}",
                      stacklevel=2)
