"""The Triton base update fused into the restore (sgd_step_, adam_step_) against the "torch"
backend (spec.py, the specification): every option, sizes around the blocks, unaligned views, the
LE-SAM+ combine, Adam's bias corrections at large t, and the skipped step (found_inf).
tests/test_triton.py checks the launches and the code compiled for the GPU.

On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py), on
the same sizes around the blocks as tests/test_ops.py; on a GPU machine they run compiled.
"""

import pytest
import torch
from helpers.asserts import assert_bits_equal, assert_close
from helpers.op_cases import OFFSETS, clone_at, random_bucket, targets, targets_and_sizes

from fused_lesam.backends import resolve, spec

LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]  # fp64 buckets take the spec ops
TRITON = [t for t in targets() if t.values[0] == "triton"]
TRITON_SIZES = [t for t in targets_and_sizes() if t.values[0] == "triton"]

SGD_OPTIONS = {  # (lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer)
    "plain": (0.1, 0.0, 0.0, 0.0, False, False, False),
    "decay-maximize": (0.1, 0.0, 0.0, 1e-2, False, True, False),
    "momentum-first": (0.05, 0.9, 0.0, 5e-4, False, False, True),
    "momentum-dampening": (0.05, 0.9, 0.1, 5e-4, False, False, False),
    "nesterov": (0.05, 0.9, 0.0, 1e-2, True, False, False),
    "nesterov-first-maximize": (0.05, 0.8, 0.0, 0.0, True, True, True),
}
ADAM_OPTIONS = {  # (lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize)
    "adam": (1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, False),
    "adam-l2": (1e-3, 0.9, 0.999, 1e-8, 1e-2, False, False, False),
    "adamw": (1e-3, 0.9, 0.999, 1e-8, 1e-2, True, False, False),
    "adamw-amsgrad": (2e-3, 0.9, 0.99, 1e-6, 0.1, True, True, False),
    "amsgrad-maximize": (1e-3, 0.9, 0.999, 1e-8, 0.0, False, True, True),
    "small-beta1": (1e-2, 0.3, 0.9, 1e-8, 1e-2, False, False, False),  # lerp weight 0.7: torch's other form
}
COMBINE = (1.5, 0.5)  # LE-SAM+'s (1 + alpha, alpha) with a center gradient


def step_inputs(size, dtype, device, seed):
    """w0, the final gradient, a center gradient and random optimizer state (v >= 0)."""
    w0, grad, center, buf, m = (random_bucket(size, dtype, device, seed=seed + k) for k in range(5))
    v = random_bucket(size, dtype, device, seed=seed + 5).square()
    vmax = random_bucket(size, dtype, device, seed=seed + 6).square()  # above v in some places, below in others
    return dict(w0=w0, grad=grad, center=center, buf=buf, m=m * 0.1, v=v, vmax=vmax)


def scalar(value, device):
    return torch.tensor(value, dtype=torch.float32, device=device)


def run_sgd(ops, x, offset, options, with_center, found_inf=0.0):
    """ops.sgd_step_ on fresh copies at ``offset``; returns (param, momentum_buffer)."""
    lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer = options
    param = clone_at(x["w0"] + 1, offset)  # the perturbed weights the op must overwrite
    backup, grad, center = (clone_at(x[k], offset) for k in ("w0", "grad", "center"))
    buf = clone_at(x["buf"], offset) if momentum != 0 else None
    ops.sgd_step_(
        param=param,
        backup=backup,
        grad=grad,
        momentum_buffer=buf,
        center=center if with_center else None,
        found_inf=scalar(found_inf, param.device),
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        init_buffer=init_buffer,
        ghat_coef=COMBINE[0],
        center_coef=COMBINE[1],
    )
    check_inputs_unchanged(x, backup, grad, center)
    return param, buf


def run_adam(ops, x, offset, options, with_center, t, found_inf=0.0):
    """ops.adam_step_ on fresh copies at ``offset``; returns (param, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize = options
    param = clone_at(x["w0"] + 1, offset)
    backup, grad, center, m, v = (clone_at(x[k], offset) for k in ("w0", "grad", "center", "m", "v"))
    vmax = clone_at(x["vmax"], offset) if amsgrad else None
    ops.adam_step_(
        param=param,
        backup=backup,
        grad=grad,
        exp_avg=m,
        exp_avg_sq=v,
        max_exp_avg_sq=vmax,
        center=center if with_center else None,
        step=scalar(t, param.device),
        found_inf=scalar(found_inf, param.device),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        amsgrad=amsgrad,
        maximize=maximize,
        ghat_coef=COMBINE[0],
        center_coef=COMBINE[1],
    )
    check_inputs_unchanged(x, backup, grad, center)
    return param, m, v, vmax


def check_inputs_unchanged(x, backup, grad, center):
    for name, t in (("w0", backup), ("grad", grad), ("center", center)):
        assert_bits_equal(t, x[name], f"the step must not write {name}")


def assert_all_close(got, want):
    for name, a, b in zip(("param", "state 1", "state 2", "state 3"), got, want):
        if b is not None:
            assert_close(a, b, msg=f"{name} differs from the spec")


# ---------------------------------------------------------------------- against the specification
@pytest.mark.parametrize("backend,device,size", TRITON_SIZES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("offset", OFFSETS)
def test_sgd_step_sizes(backend, device, size, dtype, offset):
    x = step_inputs(size, dtype, device, seed=100)
    options = SGD_OPTIONS["momentum-dampening"]
    got = run_sgd(resolve(backend, torch.device(device)), x, offset, options, with_center=True)
    assert_all_close(got, run_sgd(spec, x, offset, options, with_center=True))


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("options", list(SGD_OPTIONS))
@pytest.mark.parametrize("with_center", [False, True])
def test_sgd_step_options(backend, device, dtype, options, with_center):
    x = step_inputs(2049, dtype, device, seed=110)
    ops = resolve(backend, torch.device(device))
    got = run_sgd(ops, x, 3, SGD_OPTIONS[options], with_center)
    assert_all_close(got, run_sgd(spec, x, 3, SGD_OPTIONS[options], with_center))


@pytest.mark.parametrize("backend,device,size", TRITON_SIZES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("offset", OFFSETS)
def test_adam_step_sizes(backend, device, size, dtype, offset):
    x = step_inputs(size, dtype, device, seed=120)
    options = ADAM_OPTIONS["adamw-amsgrad"]
    got = run_adam(resolve(backend, torch.device(device)), x, offset, options, with_center=True, t=3)
    assert_all_close(got, run_adam(spec, x, offset, options, with_center=True, t=3))


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("options", list(ADAM_OPTIONS))
@pytest.mark.parametrize("with_center", [False, True])
@pytest.mark.parametrize("t", [1, 7, 1000])
def test_adam_step_options(backend, device, dtype, options, with_center, t):
    x = step_inputs(2049, dtype, device, seed=130)
    ops = resolve(backend, torch.device(device))
    got = run_adam(ops, x, 3, ADAM_OPTIONS[options], with_center, t)
    assert_all_close(got, run_adam(spec, x, 3, ADAM_OPTIONS[options], with_center, t))


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("t", [1, 10, 10_000, 1_000_000])
def test_adam_bias_corrections_at_large_t(backend, device, t):
    """1 - beta^t from the fp64 betas: with beta = 0.9999 rounded to fp32 it is off by 1.7e-4 (relative)
    at t = 1 and 1e-4 at t = 10000, which lr = 1 makes visible in the weights."""
    x = step_inputs(1025, torch.float32, device, seed=140)
    options = (1.0, 0.9999, 0.9999, 1e-8, 0.0, False, False, False)
    got = run_adam(resolve(backend, torch.device(device)), x, 0, options, with_center=False, t=t)
    assert_all_close(got, run_adam(spec, x, 0, options, with_center=False, t=t))


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_steps_from_the_first(backend, device, dtype):
    """Three steps from torch's initial state (zero moments, the buffer a copy of g at the first),
    each implementation carrying its own state: they stay within the tolerance."""
    ops = resolve(backend, torch.device(device))
    x = step_inputs(1025, dtype, device, seed=150)
    sgd_state = {impl: torch.zeros_like(x["w0"]) for impl in (ops, spec)}
    adam_state = {impl: [torch.zeros_like(x["w0"]) for _ in range(3)] for impl in (ops, spec)}
    for t in (1, 2, 3):
        params = {}
        for impl in (ops, spec):
            sgd_param, adam_param = x["w0"] + 1, x["w0"] + 1
            impl.sgd_step_(
                sgd_param,
                x["w0"],
                x["grad"],
                sgd_state[impl],
                None,
                scalar(0.0, device),
                0.1,
                0.9,
                0.0,
                1e-2,
                True,
                False,
                t == 1,
                1.0,
                0.0,
            )
            m, v, vmax = adam_state[impl]
            impl.adam_step_(
                adam_param,
                x["w0"],
                x["grad"],
                m,
                v,
                vmax,
                x["center"],
                scalar(t, device),
                scalar(0.0, device),
                1e-3,
                0.9,
                0.999,
                1e-8,
                1e-2,
                True,
                True,
                False,
                *COMBINE,
            )
            params[impl] = (sgd_param, adam_param)
        assert_all_close(
            [*params[ops], sgd_state[ops], *adam_state[ops]], [*params[spec], sgd_state[spec], *adam_state[spec]]
        )


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("found_inf", [1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("init_buffer", [False, True])
def test_skipped_step_restores_w0_and_keeps_the_state(backend, device, dtype, found_inf, init_buffer):
    """found_inf nonzero (or NaN) on the device: w <- w0 bit-exactly, no state written."""
    ops = resolve(backend, torch.device(device))
    x = step_inputs(2049, dtype, device, seed=160)
    x["grad"][7] = float("nan")  # what makes a step skipped; it must reach nothing
    param, buf = run_sgd(ops, x, 3, (0.1, 0.9, 0.0, 1e-2, True, False, init_buffer), True, found_inf)
    assert_bits_equal(param, x["w0"], "a skipped SGD step must restore w0")
    assert_bits_equal(buf, x["buf"], "a skipped SGD step must not write the momentum buffer")
    param, m, v, vmax = run_adam(ops, x, 3, ADAM_OPTIONS["adamw-amsgrad"], True, t=5, found_inf=found_inf)
    assert_bits_equal(param, x["w0"], "a skipped Adam step must restore w0")
    for name, key, state in (("exp_avg", "m", m), ("exp_avg_sq", "v", v), ("max_exp_avg_sq", "vmax", vmax)):
        assert_bits_equal(state, x[key], f"a skipped Adam step must not write {name}")


@pytest.mark.parametrize("backend,device", TRITON)
def test_float64_buckets_take_the_spec_ops(backend, device):
    """Triton passes float scalars as fp32: fp64 buckets run the spec ops (the same bits)."""
    ops = resolve(backend, torch.device(device))
    x = step_inputs(300, torch.float64, device, seed=170)
    options = SGD_OPTIONS["nesterov"]
    for a, b in zip(run_sgd(ops, x, 0, options, True), run_sgd(spec, x, 0, options, True)):
        assert_bits_equal(a, b)
    options = ADAM_OPTIONS["adamw-amsgrad"]
    for a, b in zip(run_adam(ops, x, 0, options, True, t=4), run_adam(spec, x, 0, options, True, t=4)):
        assert_bits_equal(a, b)


# ---------------------------------------------------------------------- registration
@pytest.mark.parametrize("backend,device", TRITON)
def test_opcheck_step_ops(backend, device):
    """Schema (what each op writes is declared; grad, backup, center are not written) and autograd
    registration; on the GPU also the fake kernels and AOT dispatch (fake tensors cannot run
    through the interpreter)."""
    ops = resolve(backend, torch.device(device))
    x = step_inputs(300, torch.float32, device, seed=180)
    zero, t = scalar(0.0, device), scalar(3.0, device)
    checks = ("test_schema", "test_autograd_registration")
    if device == "cuda":
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    samples = [
        (
            ops.sgd_step_,
            (
                x["w0"] + 1,
                x["w0"],
                x["grad"],
                x["buf"].clone(),
                x["center"],
                zero,
                0.1,
                0.9,
                0.0,
                1e-2,
                True,
                False,
                False,
                1.5,
                0.5,
            ),
        ),
        (
            ops.sgd_step_,
            (x["w0"] + 1, x["w0"], x["grad"], None, None, zero, 0.1, 0.0, 0.0, 0.0, False, True, False, 1.0, 0.0),
        ),
        (
            ops.adam_step_,
            (
                x["w0"] + 1,
                x["w0"],
                x["grad"],
                x["m"].clone(),
                x["v"].clone(),
                x["vmax"].clone(),
                x["center"],
                t,
                zero,
                1e-3,
                0.9,
                0.999,
                1e-8,
                1e-2,
                True,
                True,
                False,
                1.5,
                0.5,
            ),
        ),
        (
            ops.adam_step_,
            (
                x["w0"] + 1,
                x["w0"],
                x["grad"],
                x["m"].clone(),
                x["v"].clone(),
                None,
                None,
                t,
                zero,
                1e-3,
                0.9,
                0.999,
                1e-8,
                0.0,
                False,
                False,
                True,
                1.0,
                0.0,
            ),
        ),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils=checks)
