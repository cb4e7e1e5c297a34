"""Bad input to a bucket op is a clear RuntimeError that names the problem, on the kernel backends
that run on the CPU (cpp; triton through its interpreter): one table for every op.

Each case names the backends it is checked on. The messages are the compiled extension's
(csrc/bucket_args.h); the Triton backend mirrors them, with torch's names for dtypes, so the cases
that name a dtype or a step op's checks in the extension's words are the extension's alone, and
the Triton step ops have cases of their own.
"""

import pytest
import torch
from helpers.op_cases import LESAM, targets

from fused_lesam.backends import resolve

BOTH, CPP, TRITON = ("cpp", "triton"), ("cpp",), ("triton",)


def _bucket(n=8, dtype=torch.float32):
    return torch.zeros(n, dtype=dtype)


def _sgd(momentum=0.9, **tensors):
    args = dict(
        param=_bucket(),
        backup=_bucket(),
        grad=_bucket(),
        momentum_buffer=_bucket() if momentum else None,
        center=None,
        found_inf=torch.zeros(()),
    )
    args.update(tensors)
    return lambda ops: ops.sgd_step_(
        **args,
        lr=0.1,
        momentum=momentum,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        init_buffer=False,
        ghat_coef=1.0,
        center_coef=0.0,
    )


def _adam(amsgrad=True, **tensors):
    args = dict(
        param=_bucket(),
        backup=_bucket(),
        grad=_bucket(),
        exp_avg=_bucket(),
        exp_avg_sq=_bucket(),
        max_exp_avg_sq=_bucket() if amsgrad else None,
        center=None,
        step=torch.ones(()),
        found_inf=torch.zeros(()),
    )
    args.update(tensors)
    return lambda ops: ops.adam_step_(
        **args,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        amsgrad=amsgrad,
        maximize=False,
        ghat_coef=1.0,
        center_coef=0.0,
    )


def _sgd_call(param_size=8, buf="given", found_inf=None, momentum=0.9):
    found_inf = torch.tensor(0.0) if found_inf is None else found_inf
    b = torch.zeros(8)
    return lambda ops: ops.sgd_step_(
        torch.zeros(param_size),
        b,
        b,
        None if buf is None else torch.zeros(8),
        None,
        found_inf,
        0.1,
        momentum,
        0.0,
        0.0,
        False,
        False,
        False,
        1.0,
        0.0,
    )


def _adam_call(vmax=None, step=None):
    step = torch.tensor(1.0) if step is None else step
    b = torch.zeros(8)
    return lambda ops: ops.adam_step_(
        torch.zeros(8),
        b,
        b,
        torch.zeros(8),
        torch.zeros(8),
        vmax,
        None,
        step,
        torch.tensor(0.0),
        1e-3,
        0.9,
        0.999,
        1e-8,
        0.0,
        False,
        True,
        False,
        1.0,
        0.0,
    )


# name: (call on a backend's ops, the message it must raise, the backends it is checked on)
ERRORS = {
    # sq_norm, perturb_, restore_
    "grad dtype": (
        lambda ops: ops.perturb_(
            _bucket(), _bucket(dtype=torch.float16), _bucket(), torch.tensor(1.0), *LESAM, False, None
        ),
        "grad has dtype",
        BOTH,
    ),
    "backup size": (
        lambda ops: ops.perturb_(_bucket(), _bucket(), _bucket(9), torch.tensor(1.0), *LESAM, False, None),
        "backup has 9 elements",
        BOTH,
    ),
    "center size": (
        lambda ops: ops.perturb_(_bucket(), _bucket(), _bucket(), torch.tensor(1.0), *LESAM, False, _bucket(7)),
        "center has 7 elements",
        BOTH,
    ),
    "strided param": (
        lambda ops: ops.perturb_(_bucket(16)[::2], _bucket(), _bucket(), torch.tensor(1.0), *LESAM, False, None),
        "param must be contiguous",
        BOTH,
    ),
    "integer bucket": (
        lambda ops: ops.restore_(
            _bucket(dtype=torch.int32), _bucket(dtype=torch.int32), _bucket(dtype=torch.int32), None, 1.0, 0.0
        ),
        "buckets must be float32, float64, float16 or bfloat16",
        BOTH,
    ),
    "sq shape": (
        lambda ops: ops.perturb_(_bucket(), _bucket(), _bucket(), torch.ones(1), *LESAM, False, None),
        "sq must be the 0-d",
        BOTH,
    ),
    "sigma_t dtype": (
        lambda ops: ops.perturb_(
            _bucket(), _bucket(), _bucket(), torch.tensor(1.0), *LESAM, False, None, torch.tensor(0.1)
        ),
        "sigma_t must be a 0-d float64 tensor",
        BOTH,
    ),
    "weights count": (
        lambda ops: ops.sq_norm([_bucket(), _bucket()], [None]),
        "got 2 grad buckets but 1 weights",
        BOTH,
    ),
    "weight dtype": (
        lambda ops: ops.sq_norm([_bucket()], [_bucket(dtype=torch.bfloat16)]),
        "weights\\[0\\] has dtype",
        BOTH,
    ),
    "restore grad size": (
        lambda ops: ops.restore_(_bucket(), _bucket(), _bucket(3), None, 1.0, 0.0),
        "grad has 3 elements",
        BOTH,
    ),
    # XSAM's ops
    "dots counts": (lambda ops: ops.xsam_dots([_bucket()], [_bucket()], []), "they must match one to one", BOTH),
    "dots backup size": (
        lambda ops: ops.xsam_dots([_bucket()], [_bucket(5)], [_bucket()]),
        "backups\\[0\\] has 5 elements",
        BOTH,
    ),
    "restore coefs shape": (
        lambda ops: ops.xsam_restore_(_bucket(), _bucket(), _bucket(), None, torch.zeros(3)),
        "coefs must be a \\(2,\\) float32/float64 tensor",
        BOTH,
    ),
    "restore delta dtype": (
        lambda ops: ops.xsam_restore_(_bucket(), _bucket(), _bucket(), _bucket(dtype=torch.float16), torch.zeros(2)),
        "delta has dtype",
        BOTH,
    ),
    "probe coefs dtype": (
        lambda ops: ops.xsam_probe_(
            _bucket(), _bucket(), _bucket(), _bucket(), torch.zeros(2, dtype=torch.int64), True
        ),
        "coefs must be",
        BOTH,
    ),
    "probe grad size": (
        lambda ops: ops.xsam_probe_(_bucket(), _bucket(), _bucket(2), _bucket(), torch.zeros(2), True),
        "grad has 2 elements",
        BOTH,
    ),
    # LookSAM's ops
    "look dots counts": (lambda ops: ops.look_dots([_bucket()], []), "they must match one to one", BOTH),
    "look dots center size": (
        lambda ops: ops.look_dots([_bucket()], [_bucket(5)]),
        "centers\\[0\\] has 5 elements",
        BOTH,
    ),
    "look store coef shape": (
        lambda ops: ops.look_store_(_bucket(), _bucket(), _bucket(), torch.zeros(2), torch.zeros(())),
        "coef must be a 0-d float32/float64 tensor",
        BOTH,
    ),
    "look store center size": (
        lambda ops: ops.look_store_(_bucket(), _bucket(), _bucket(3), torch.zeros(()), torch.zeros(())),
        "center has 3 elements",
        BOTH,
    ),
    "look store found_inf dtype": (
        lambda ops: ops.look_store_(
            _bucket(), _bucket(), _bucket(), torch.zeros(()), torch.zeros((), dtype=torch.float64)
        ),
        "found_inf must be a 0-d float32 tensor",
        BOTH,
    ),
    "look add dir size": (
        lambda ops: ops.look_add_(_bucket(), _bucket(4), torch.zeros(())),
        "look_dir has 4 elements",
        BOTH,
    ),
    "look add coef dtype": (
        lambda ops: ops.look_add_(_bucket(), _bucket(), torch.zeros((), dtype=torch.int64)),
        "coef must be a 0-d float32/float64 tensor",
        BOTH,
    ),
    # the base update: the extension's messages
    "sgd backup size": (_sgd(backup=_bucket(9)), "sgd_step_: backup has 9 elements but param has 8", CPP),
    "sgd grad dtype": (_sgd(grad=_bucket(dtype=torch.float16)), "sgd_step_: grad has dtype Half", CPP),
    "sgd buffer dtype": (
        _sgd(momentum_buffer=_bucket(dtype=torch.float64)),
        "sgd_step_: momentum_buffer has dtype",
        CPP,
    ),
    "sgd buffer missing": (_sgd(momentum_buffer=None), "momentum_buffer must be given exactly when momentum != 0", CPP),
    "sgd buffer unwanted": (
        _sgd(momentum=0.0, momentum_buffer=_bucket()),
        "momentum_buffer must be given exactly when momentum != 0 \\(it is not\\)",
        CPP,
    ),
    "sgd center size": (_sgd(center=_bucket(7)), "sgd_step_: center has 7 elements", CPP),
    "sgd strided param": (_sgd(param=_bucket(16)[::2]), "sgd_step_: param must be contiguous", CPP),
    "sgd 2-d param": (_sgd(param=_bucket().view(2, 4)), "sgd_step_: param must be a flat \\(1-D\\) bucket", CPP),
    "sgd found_inf shape": (_sgd(found_inf=torch.zeros(1)), "sgd_step_: found_inf must be a 0-d float32 tensor", CPP),
    "sgd found_inf dtype": (
        _sgd(found_inf=torch.zeros((), dtype=torch.float64)),
        "sgd_step_: found_inf must be a 0-d float32 tensor, got a Double",
        CPP,
    ),
    "adam integer bucket": (
        _adam(param=_bucket(dtype=torch.int32)),
        "adam_step_: param has dtype Int; buckets must be float32",
        CPP,
    ),
    "adam exp_avg size": (_adam(exp_avg=_bucket(5)), "adam_step_: exp_avg has 5 elements", CPP),
    "adam exp_avg_sq dtype": (_adam(exp_avg_sq=_bucket(dtype=torch.bfloat16)), "adam_step_: exp_avg_sq has dtype", CPP),
    "adam max missing": (_adam(max_exp_avg_sq=None), "max_exp_avg_sq must be given exactly when amsgrad", CPP),
    "adam max unwanted": (
        _adam(amsgrad=False, max_exp_avg_sq=_bucket()),
        "max_exp_avg_sq must be given exactly when amsgrad \\(it is not\\)",
        CPP,
    ),
    "adam step dtype": (
        _adam(step=torch.ones((), dtype=torch.int64)),
        "adam_step_: step must be a 0-d float32 tensor",
        CPP,
    ),
    "adam step shape": (_adam(step=torch.ones(1)), "adam_step_: step must be a 0-d float32 tensor", CPP),
    "adam found_inf shape": (
        _adam(found_inf=torch.zeros(2)),
        "adam_step_: found_inf must be a 0-d float32 tensor",
        CPP,
    ),
    # the base update: the Triton backend's
    "no momentum buffer": (_sgd_call(buf=None), "momentum_buffer must be given exactly when momentum != 0", TRITON),
    "buffer without momentum": (
        _sgd_call(momentum=0.0),
        "momentum_buffer must be given exactly when momentum != 0",
        TRITON,
    ),
    "param size": (_sgd_call(param_size=9), "backup has 8 elements but param has 9", TRITON),
    "found_inf dtype": (
        _sgd_call(found_inf=torch.tensor(0.0, dtype=torch.float64)),
        "found_inf must be a 0-d float32",
        TRITON,
    ),
    "found_inf shape": (_sgd_call(found_inf=torch.zeros(1)), "found_inf must be a 0-d float32", TRITON),
    "no max_exp_avg_sq": (_adam_call(), "max_exp_avg_sq must be given exactly when amsgrad", TRITON),
    "step dtype": (_adam_call(vmax=torch.zeros(8), step=torch.tensor(1)), "step must be a 0-d float32", TRITON),
}

CASES = [
    pytest.param(backend, device, case, id=f"{target.id}-{case}", marks=target.marks)
    for target in targets()
    for backend, device in [target.values[:2]]
    if device == "cpu"
    for case, (_, _, backends) in ERRORS.items()
    if backend in backends
]


@pytest.mark.parametrize("backend,device,case", CASES)
def test_bad_input_is_a_clear_error(backend, device, case):
    call, message, _ = ERRORS[case]
    with pytest.raises(RuntimeError, match=message):
        call(resolve(backend, torch.device(device)))
