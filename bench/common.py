"""What every benchmark of the suite shares: timing with device synchronisation, the machine
description written into each JSON, a progress line, CIFAR-100 (local files or synthetic), and the
throughput modes of FusedLESAM / FusedSAM that the epoch table and the accuracy table both run."""

from __future__ import annotations

import json
import math
import os
import pickle
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fused_lesam

CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
CIFAR_TRAIN_SIZE = 50000


@dataclass(frozen=True)
class Mode:
    """A throughput mode: ``optimizer`` ("FusedLESAM" or "FusedSAM") built with ``kwargs`` on top of
    its usual hyperparameters. Its steps repeat in cycles of ``cycle`` steps (one full two-pass step,
    then one-pass steps); ``passes`` is its forward/backward passes per step over SGD's one, the
    floor of its time over SGD's when the passes dominate the step. ``momentum_sam``: its one pass is
    at the perturbed point, after first_step(), with no backward at w before it."""

    label: str
    optimizer: str
    kwargs: dict = field(default_factory=dict)
    cycle: int = 1
    momentum_sam: bool = False

    @property
    def passes(self) -> float:
        return 1.0 if self.momentum_sam else (self.cycle + 1) / self.cycle


MODES = {
    "interval": Mode("interval k=2", "FusedLESAM", dict(sam_interval=2), cycle=2),
    "looksam": Mode("LookSAM k=5", "FusedLESAM", dict(look_k=5, look_alpha=0.7), cycle=5),
    "msam": Mode("Momentum-SAM", "FusedSAM", dict(momentum_sam=True), momentum_sam=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """Where a figure was measured: written beside it in every JSON."""
    info = {
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fused_lesam": fused_lesam.__version__,
        "backends": {name: (why or "available") for name, why in fused_lesam.available_backends().items()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@contextmanager
def one_thread():
    """torch on one CPU thread inside the block. For the small nets of fidelity.py and accuracy.py:
    they gain little from a second thread, and on a shared 2-core machine two threads per process
    oversubscribe the cores; a 200-step fidelity run took 78 s with two threads there, 8 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def results_dir() -> Path:
    """Where the suite writes: bench/results/, or $FUSED_LESAM_BENCH_RESULTS (the tests use it)."""
    path = Path(os.environ.get("FUSED_LESAM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict) -> Path:
    path = results_dir() / name
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


class Progress:
    """A one-line progress bar on stderr for anything that takes more than a moment (redrawn at
    most 5 times a second on a terminal; in a log, a line at each quarter)."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = self.drawn = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        now = time.perf_counter()
        finished = self.done >= self.total
        if self.tty and (now - self.drawn > 0.2 or finished):
            self.drawn = now
            width = 24
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(
                f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{now - self.start:5.1f}s" + ("\n" if finished else "")
            )
            sys.stderr.flush()
        elif not self.tty and 4 * self.done // max(self.total, 1) > 4 * before // max(self.total, 1):
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} after {now - self.start:.1f}s\n")


def load_cifar100(root: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
    """CIFAR-100's training set from the standard python pickles under ``root`` (the folder
    ``cifar-100-python`` or its parent), as uint8 NCHW images and labels; never downloads.
    Returns (None, None, why) when there is no such folder."""
    if not root:
        return None, None, "no --data folder given"
    for folder in (Path(root), Path(root) / "cifar-100-python"):
        if (folder / "train").is_file():
            with open(folder / "train", "rb") as f:
                raw = pickle.load(f, encoding="bytes")
            images = torch.from_numpy(raw[b"data"]).reshape(-1, 3, 32, 32)
            labels = torch.tensor(raw[b"fine_labels"])
            return images, labels, f"CIFAR-100 from {folder}"
    return None, None, f"no CIFAR-100 'train' file under {root}"


class Batches:
    """Training batches of CIFAR-100 (standard augmentation: 4-pixel padded random crop and
    horizontal flip, done on the device) or, without the files, synthetic tensors of the same shape."""

    def __init__(self, root: str | None, batch: int, device: torch.device, channels_last: bool, seed: int = 0):
        images, labels, self.source = load_cifar100(root)
        self.synthetic = images is None
        if self.synthetic:
            self.source = f"synthetic CIFAR-100-shaped tensors ({self.source})"
        self.batch, self.device, self.channels_last = batch, device, channels_last
        self.gen = torch.Generator().manual_seed(seed)
        self.images, self.labels = images, labels
        self.size = CIFAR_TRAIN_SIZE if images is None else len(images)
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.batch)

    def epoch(self):
        order = torch.randperm(self.size, generator=self.gen)
        for start in range(0, self.size, self.batch):
            yield self.make(order[start : start + self.batch])

    def make(self, index: torch.Tensor):
        if self.synthetic:
            x = torch.randn(len(index), 3, 32, 32, generator=self.gen).to(self.device)
            y = torch.randint(0, 100, (len(index),), generator=self.gen).to(self.device)
        else:
            x = self.images[index].to(self.device).float().div_(255)
            y = self.labels[index].to(self.device)
            x = (self._augment(x) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        dx, dy = torch.randint(0, 9, (2,), generator=self.gen).tolist()  # one offset per batch: cheap
        x = padded[:, :, dy : dy + 32, dx : dx + 32]
        flip = torch.rand(n, generator=self.gen).to(x.device) < 0.5
        return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
