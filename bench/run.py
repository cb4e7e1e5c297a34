"""The benchmark suite, the project's main job (README: ./dev bench). Its quick default runs in a
few minutes on a 2-core CPU:

  1. epoch_time.py          the paper's Table 6 (time per epoch, SAM vs LE-SAM), extended, with the
                            throughput modes' epoch time over SGD's against their targets
  2. test_step_overhead.py  the step microbenchmark (issue 14): the whole step against the loops and
                            the byte limit, interleaved rounds, pass/short report
  3. radius_dynamics.py     ||g||, rho_t, sigma_t per step of a short run, plotted
  4. fidelity.py            each throughput mode's update gradient against LE-SAM's g_hat on one
                            shared trajectory (cosine, relative error), plotted
  5. accuracy.py            --full only: the real-data accuracy table (scikit-learn's digits, clean
                            and noisy labels, every optimizer and mode, 5 seeds); needs scikit-learn,
                            and says so and skips it where the interpreter lacks it

Everything lands in bench/results/ (JSON with the machine, PNG charts). Options:
  --full          the paper's protocol for part 1 on a GPU (all models, 5 whole epochs, paper batch
                  sizes, channels_last), all parameter sets in part 2, and part 5
  --sets A,B      the parameter sets of part 2 (default resnet18,vit_s16,many600; bench/models.py)
  --data DIR      CIFAR-100 python files for part 1 (else synthetic tensors, and it says so)
  --device DEV    default: cuda when there is a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import accuracy
import epoch_time
import fidelity
import pytest
import radius_dynamics
import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets")
    args = parser.parse_args()
    parts = 5 if args.full else 4
    print(f"== 1/{parts} time per epoch (the paper's Table 6)", flush=True)
    table = ["--device", args.device] + (["--data", args.data] if args.data else [])
    if args.full:
        table += ["--models", "all", "--epochs", "5", "--channels-last"]
    epoch_time.main(table)
    print(f"\n== 2/{parts} the step microbenchmark", flush=True)
    sets = args.sets or ("resnet18,wrn28_10,pyramidnet110,vit_s16,many600" if args.full else "resnet18,vit_s16,many600")
    # On a CPU the quick default leaves out the torch backend's row: that specification of the kernels,
    # with its temporaries, is by far the slowest row there and would take most of the run.
    backends = "auto" if args.device == "cpu" and not args.full else "all"
    code = pytest.main(
        [
            str(HERE / "test_step_overhead.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--device",
            args.device,
            "--sets",
            sets,
            "--backends",
            backends,
        ]
    )
    print(f"\n== 3/{parts} radius dynamics", flush=True)
    radius_dynamics.main(["--device", args.device])
    print(f"\n== 4/{parts} fidelity of the throughput modes", flush=True)
    fidelity.main(["--device", args.device])
    if args.full:
        print(f"\n== 5/{parts} the accuracy table (scikit-learn's digits)", flush=True)
        accuracy_table()
    return int(code)


def accuracy_table() -> bool:
    """Part 5, where the interpreter has scikit-learn (an existing one, FUSED_LESAM_PYTHON, may not:
    then a line says so and the part is skipped). Whether it ran."""
    if importlib.util.find_spec("sklearn") is None:
        print(
            f"scikit-learn is missing from this interpreter ({sys.executable}): the accuracy table is skipped. "
            "Install it (pip install scikit-learn), or run ./dev bench --full with the .venv ./dev sets up"
        )
        return False
    accuracy.main([])
    return True


if __name__ == "__main__":
    sys.exit(main())
