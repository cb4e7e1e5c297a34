"""Throughput modes: which steps pay SAM's second pass, and LookSAM's reuse of its direction.

``sam_interval=k`` takes the full sharpness-aware step every k-th step and a plain base step (one
pass, the gradient at w) in between (Composer's SAM ``interval``); ``sam_start=s`` takes plain steps
before step s (SAM late in training, Zhou et al. 2025). LookSAM (Liu et al., CVPR 2022) takes the
full step every ``look_k``-th step, keeps there the part of the SAM gradient orthogonal to the
first gradient, g_v = g_hat - (g_hat . g / ||g||^2) g, and adds it back on the steps in between:
g + look_alpha * (||g|| / ||g_v||) * g_v (docs/design.md §1 "Throughput modes").

The step kind is decided on the host from the step count (`step_kind`), so the training loop can
ask whether a second pass is wanted (`needs_pass`) without a device sync. LookSAM's g_v is a
buffer of each bucket (``look_dir``), its norm a 0-d tensor of the engine (``_look_norm``).
"""

from __future__ import annotations

import math

from .checks import check_value, is_real

__all__ = ["FULL", "PLAIN", "REUSE", "Modes", "needs_pass"]

FULL = "full"  # the sharpness-aware step: a second forward/backward at the perturbed point
PLAIN = "plain"  # the base optimizer's step with the gradient at w
REUSE = "reuse"  # LookSAM: the gradient at w plus the stored g_v, scaled


def needs_pass(kind: str) -> bool:
    """Whether a step of this kind needs a forward/backward at the perturbed point between
    first_step() and second_step() (the one definition behind ``opt.needs_perturbed_pass``)."""
    return kind == FULL


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Modes:
    """The schedule of step kinds: ``sam_interval``, ``sam_start``, ``look_k``, ``look_alpha``."""

    def __init__(self, sam_interval: int = 1, sam_start: int = 0, look_k: int = 1, look_alpha: float = 0.7):
        check_value("sam_interval", sam_interval, _is_int(sam_interval) and sam_interval >= 1, "an int >= 1")
        check_value("sam_start", sam_start, _is_int(sam_start) and sam_start >= 0, "an int >= 0")
        check_value("look_k", look_k, _is_int(look_k) and look_k >= 1, "an int >= 1 (1: LookSAM off)")
        check_value(
            "look_alpha",
            look_alpha,
            is_real(look_alpha) and math.isfinite(look_alpha) and look_alpha >= 0,
            "a finite number >= 0",
        )
        if look_k > 1 and sam_interval > 1:
            raise ValueError(
                f"look_k={look_k} and sam_interval={sam_interval} both set how often the full SAM step is "
                f"taken: choose one, look_k (LookSAM: the steps in between reuse the SAM direction) or "
                f"sam_interval (the steps in between are plain base steps)"
            )
        self.sam_interval = sam_interval
        self.sam_start = sam_start
        self.look_k = look_k
        self.look_alpha = float(look_alpha)

    @property
    def default(self) -> bool:
        """Every step is a full step (no option set)."""
        return self.sam_interval == 1 and self.sam_start == 0 and self.look_k == 1

    @property
    def looksam(self) -> bool:
        return self.look_k > 1

    def step_kind(self, t: int) -> str:
        """The kind of step t (t = completed steps): full iff t >= sam_start and (t - sam_start) is a
        multiple of the period; LookSAM reuses g_v on the other steps from sam_start on."""
        period = self.look_k if self.looksam else self.sam_interval
        if t >= self.sam_start and (t - self.sam_start) % period == 0:
            return FULL
        return REUSE if self.looksam and t > self.sam_start else PLAIN
