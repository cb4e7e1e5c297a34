"""Checkpoints: the engine's state dict is the base optimizer's, plus its own counters.

The param groups hold our hyperparameters next to the base's, so torch's state dict carries them.
The step count resumes the schedule of the throughput modes; LookSAM's g_v (one tensor per
bucket) and ||g_v|| are saved with it, so that a resumed run reuses the same direction.
A state dict of a plain torch optimizer of the base's class loads too (then the hyperparameters of
the optimizer's groups and its step counts are kept); one of another kind of fused optimizer, or
with values the optimizer refuses, is refused before anything changes.
"""

from __future__ import annotations

from typing import Any

import torch

from .checks import check_base_hypers

__all__ = ["STATE_KEY", "state_dict", "load_state_dict"]

STATE_KEY = "fused_lesam"  # our counters, next to the base optimizer's "state" and "param_groups"


def state_dict(opt) -> dict[str, Any]:
    if opt._progress.perturbed:
        raise RuntimeError("state_dict() between first_step() and second_step(): the parameters are perturbed")
    state = opt.base.state_dict()
    count = int(opt._device_count) if opt.capturable else opt._progress.count
    state[STATE_KEY] = {"kind": type(opt).__name__, "step": count, "skipped_steps": opt.skipped_steps.clone()}
    if opt._modes.looksam:
        state[STATE_KEY]["look_dirs"] = [b.ensure_look_dir().clone() for b in opt._buckets]
        state[STATE_KEY]["look_norm"] = opt._look_norm.clone()
    return state


def load_state_dict(opt, state_dict: dict[str, Any]) -> None:
    if opt._progress.perturbed:
        raise RuntimeError("load_state_dict() between first_step() and second_step(): finish the step first")
    state_dict, ours = loadable(opt, state_dict)
    opt.base.load_state_dict(state_dict)
    # torch's load_state_dict builds new group dicts and a new state: share them again.
    opt.param_groups = opt.base.param_groups
    opt.state = opt.base.state
    if opt._fused_update is not None:  # the loaded tensors go into the flat buffers
        opt._fused_update.adopt(opt._buckets)
    if ours is None:  # a plain torch optimizer's state: our counters go on as they were
        return
    opt._progress.count = int(ours["step"])
    if opt.capturable:
        opt._device_count.fill_(opt._progress.count)
    opt.skipped_steps.copy_(ours["skipped_steps"])
    if opt._modes.looksam:  # without a saved direction (LookSAM was off), the reuse starts plain
        dirs = ours.get("look_dirs")
        if dirs is None:
            dirs, norm = [torch.zeros_like(b.grad) for b in opt._buckets], torch.zeros(())
        else:
            norm = ours["look_norm"]
        for bucket, saved in zip(opt._buckets, dirs):
            bucket.ensure_look_dir().copy_(saved)
        opt._look_norm.copy_(norm)


def loadable(opt, state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the state dict for the base, our counters or None for a plain torch optimizer's), after
    every check that can fail: loading must not stop half way and leave the optimizer broken."""
    state_dict = dict(state_dict)
    ours = state_dict.pop(STATE_KEY, None)
    kind = type(opt).__name__
    saved_by = ours.get("kind") if ours is not None else None
    if saved_by is not None and saved_by != kind:
        raise ValueError(
            f"this state dict was saved by {saved_by}, and this is a {kind}: their hyperparameters and "
            f"state differ; load it into a {saved_by}. Nothing was changed"
        )
    saved_groups = state_dict.get("param_groups", [])
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"this state dict has {len(saved_groups)} param groups and the optimizer "
            f"{len(opt.param_groups)}: load it into an optimizer built on the same groups"
        )
    groups = []
    for saved, current in zip(saved_groups, opt.param_groups):
        missing = [name for name in opt._hyper_names if name not in saved]
        if missing and ours is not None:
            raise ValueError(
                f"this state dict was saved by another kind of optimizer: its param groups lack "
                f"{missing}, which {kind} needs; load it into the class that saved it. Nothing was changed"
            )
        group = {**{name: current[name] for name in missing}, **saved}
        opt._check_group(group)
        check_base_hypers(group, opt._hyper_names)
        groups.append(group)
    state_dict["param_groups"] = groups
    dirs = ours.get("look_dirs") if ours is not None else None
    if opt._modes.looksam and dirs is not None:
        shapes = [tuple(b.grad.shape) for b in opt._buckets]
        if [tuple(d.shape) for d in dirs] != shapes:
            raise ValueError(
                f"this state dict's LookSAM directions have shapes {[tuple(d.shape) for d in dirs]}, this "
                f"optimizer's buckets {shapes}: load it into an optimizer built on the same parameters and "
                f"groups. Nothing was changed"
            )
    return state_dict, ours
