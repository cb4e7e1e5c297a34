"""Momentum-SAM (``FusedSAM(momentum_sam=True)``): the perturbation along the base optimizer's momentum.

MSAM (Becker, Altrock, Risse, NeurIPS 2025, arXiv 2401.12033) perturbs along the negative momentum
instead of a fresh gradient, so a step needs one forward/backward only::

    first_step:  n = ||v|| over every bucket; per bucket: backup <- w; w <- w - rho * v / (n + 1e-12)
    (caller)     the one forward/backward, at the perturbed point
    second_step: as SAM's: w <- backup (bit-exact), the base step from w with that gradient

v is the base optimizer's momentum: torch.optim.SGD's ``momentum_buffer`` or Adam/AdamW's
``exp_avg``, read from the fused base update's flat state buffers (`fused_lesam.base_update`), so
Momentum-SAM needs that update and is refused where it cannot run. Before any momentum exists v = 0
and the perturbation is 0 (the perturb op's zero-norm case): the first step is a plain step. The
direction -v is the engine's perturb op with v in place of the gradient and the signed radius -rho
(a fixed radius is ``sigma = inf``, and min(inf, -rho) = -rho in every backend).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["MOMENTUM_STATE", "check_available", "check_step", "directions", "sq_norm", "restore_idle"]

# The flat state buffer holding v, per kind of fused base update.
MOMENTUM_STATE = {"sgd": "momentum_buffer", "adam": "exp_avg"}

_USE_INSTEAD = (
    "Momentum-SAM reads v from the fused base update: use base=torch.optim.SGD (momentum > 0), Adam or "
    "AdamW with base_update='auto', on unsharded parameters, or FusedSAM without momentum_sam for the "
    "two-pass SAM"
)


def check_available(opt) -> None:
    """ValueError naming the fix when Momentum-SAM cannot run on ``opt`` (at construction)."""
    if opt._fused_update is None:
        raise ValueError(
            f"momentum_sam=True needs the fused base update, and this optimizer takes torch's own step "
            f"({opt.base_update_reason}). {_USE_INSTEAD}"
        )
    why = opt._fused_update.why_not()
    if why:
        raise ValueError(
            f"momentum_sam=True needs the fused base update at every step, and it is not possible with "
            f"these param groups: {why}; give the base's hyperparameters as Python numbers"
        )
    why = _no_momentum(opt)
    if why:
        raise ValueError(why)


def check_step(opt) -> None:
    """RuntimeError, before anything changes, when this step cannot be a Momentum-SAM step: torch's
    own step (the fused update's fallback) would keep the momentum outside the flat buffers read here."""
    why = opt._fused_update.why_not()
    if why:
        raise RuntimeError(
            f"{type(opt).__name__}(momentum_sam=True): the fused base update cannot take this step ({why}), "
            f"and Momentum-SAM reads the momentum from its flat state; give the base's hyperparameters as "
            f"Python numbers. The parameters are unchanged"
        )
    why = _no_momentum(opt)
    if why:
        raise RuntimeError(why)
    if opt._progress.local_pending:
        raise RuntimeError(
            "local_first_pass() with momentum_sam=True: Momentum-SAM has no first backward (it perturbs "
            "along the momentum), so there is nothing to keep local; drop the local_first_pass block"
        )


def _no_momentum(opt) -> str:
    """Why some param group has no momentum to perturb along ("" when every one has)."""
    if opt._fused_update.kind != "sgd":
        return ""
    for index, group in enumerate(opt.param_groups):
        if group["momentum"] == 0:
            return (
                f"momentum_sam=True perturbs along SGD's momentum buffer, and param group {index} has "
                f"momentum=0 (no buffer): give torch.optim.SGD momentum > 0 (the authors' code defaults to 0.9)"
            )
    return ""


def directions(opt) -> list[Tensor]:
    """v per bucket, in the buckets' order: the fused update's flat momentum (zero where a parameter
    has none yet)."""
    fused = opt._fused_update
    return fused.flat_buffers(MOMENTUM_STATE[fused.kind])


def sq_norm(opt, directions: list[Tensor]) -> Tensor:
    """||v||^2 over every bucket (and device, and rank): 0-d, on the main device."""
    of_bucket = {id(bucket): v for bucket, v in zip(opt._buckets, directions)}
    return opt._reduce_buckets(lambda ops, mine: ops.sq_norm([of_bucket[id(b)] for b in mine], [None] * len(mine)))


def restore_idle(opt) -> None:
    """w <- backup for the parameters without a gradient in the pass. The fused update leaves them
    as they are (as torch does), which for SAM is w, since their zero gradient region was not
    perturbed; here their momentum moved them, and they must come back."""
    for bucket in opt._buckets:
        if bucket.all_grads_bound():
            continue
        for i, has_grad in enumerate(bucket.grads_bound()):
            if not has_grad:
                span = bucket.span(i, i + 1)
                bucket.param[span].copy_(bucket.backup[span])
