"""The base update fused into the restore (sgd_step_, adam_step_) on every kernel backend, against
the "torch" backend (spec.py, the specification); and the specification against torch.optim.SGD / Adam /
AdamW. Same targets, sizes, dtypes and unaligned offsets as tests/test_ops.py, every option of the
two optimizers with and without the LE-SAM+ center, the skipped step, non-finite gradients,
opcheck (bad input: tests/test_op_errors.py). A backend without these ops fails with AttributeError.
"""

import pytest
import torch
from helpers.asserts import TOLERANCES, assert_bits_equal
from helpers.op_cases import DTYPES, OFFSETS, TARGETS, TRACEABLE, clone_at, random_bucket, targets

from fused_lesam.backends import resolve, spec

# test_ops' sizes per target, with buckets over a million elements cut to 2^18 + 3: still several
# CPU tasks (kGrain = 32768) and many GPU blocks, and a quarter of the run time (the spec and the
# comparisons of Adam's four tensors dominate it).
LARGE = (1 << 18) + 3


def targets_and_sizes():
    return [
        pytest.param(backend, device, min(size, LARGE), id=f"{name}-{min(size, LARGE)}", marks=marks)
        for name, (backend, device, sizes, marks) in TARGETS.items()
        for size in sizes
    ]


LESAM_PLUS = (1.5, 0.5)  # (ghat_coef, center_coef) = (1 + alpha, alpha)

# The float and bool arguments of sgd_step_ (all but ghat_coef/center_coef), per case: what each
# case changes from plain SGD.
SGD_PLAIN = dict(
    lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, init_buffer=False
)
SGD_OPTIONS = {
    "plain": SGD_PLAIN,
    "momentum": dict(SGD_PLAIN, momentum=0.9),
    # torch's first step: the buffer becomes a copy of g, dampening not applied.
    "first-step": dict(SGD_PLAIN, momentum=0.9, dampening=0.3, weight_decay=1e-2, init_buffer=True),
    "dampening": dict(SGD_PLAIN, lr=0.05, momentum=0.9, dampening=0.3),
    "nesterov-decay": dict(SGD_PLAIN, momentum=0.9, weight_decay=1e-2, nesterov=True),
    "weight-decay": dict(SGD_PLAIN, weight_decay=5e-2),
    "maximize": dict(SGD_PLAIN, momentum=0.5, weight_decay=1e-2, nesterov=True, maximize=True),
}

# (step t, the float and bool arguments of adam_step_), per case: what each case changes from
# plain Adam.
ADAM_PLAIN = dict(
    lr=1e-2,
    beta1=0.9,
    beta2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    decoupled_weight_decay=False,
    amsgrad=False,
    maximize=False,
)
ADAM_OPTIONS = {
    "adam": (1, ADAM_PLAIN),
    "adam-l2": (3, dict(ADAM_PLAIN, weight_decay=1e-2)),
    "adamw": (10, dict(ADAM_PLAIN, weight_decay=1e-2, decoupled_weight_decay=True)),
    "amsgrad": (5, dict(ADAM_PLAIN, lr=1e-3, beta2=0.99, amsgrad=True)),
    "adamw-amsgrad-maximize": (
        2,
        dict(
            ADAM_PLAIN, beta1=0.8, eps=1e-6, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=True
        ),
    ),
    # 1 - beta1 = 0.7: the second branch of the two-branch lerp.
    "large-lerp-weight": (4, dict(ADAM_PLAIN, beta1=0.3, beta2=0.5, eps=1e-3, weight_decay=1e-2, amsgrad=True)),
    "late-step": (1000, dict(ADAM_PLAIN, lr=1e-3, weight_decay=1e-2, decoupled_weight_decay=True)),
}

# What each op writes besides param (the rest of its tensors it must leave alone).
STATE = {"sgd_step_": ("momentum_buffer",), "adam_step_": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def sgd_case(name, size, dtype, device, with_center, regime="normal"):
    """(op name, tensors, scalars) of one sgd_step_ call; the tensors at offset 0, to be cloned."""
    options = SGD_OPTIONS[name]
    tensors = dict(
        param=random_bucket(size, dtype, device, seed=50),  # the perturbed weights the op overwrites
        backup=random_bucket(size, dtype, device, seed=51),
        grad=random_bucket(size, dtype, device, seed=52, regime=regime),
        momentum_buffer=random_bucket(size, dtype, device, seed=53) if options["momentum"] != 0 else None,
        center=random_bucket(size, dtype, device, seed=54) if with_center else None,
    )
    ghat_coef, center_coef = LESAM_PLUS if with_center else (1.0, 0.0)
    return "sgd_step_", tensors, dict(options, ghat_coef=ghat_coef, center_coef=center_coef)


def adam_case(name, size, dtype, device, with_center, regime="normal"):
    """(op name, tensors, scalars) of one adam_step_ call, with a state as after a few steps."""
    t, options = ADAM_OPTIONS[name]
    second_moment = random_bucket(size, torch.float64, device, seed=63).square() * 0.01
    tensors = dict(
        param=random_bucket(size, dtype, device, seed=60),
        backup=random_bucket(size, dtype, device, seed=61),
        grad=random_bucket(size, dtype, device, seed=62, regime=regime),
        exp_avg=random_bucket(size, dtype, device, seed=64) * 0.1,
        exp_avg_sq=second_moment.to(dtype),
        # Larger than exp_avg_sq's new value at some elements, smaller at others.
        max_exp_avg_sq=(random_bucket(size, torch.float64, device, seed=65).square() * 0.02).to(dtype)
        if options["amsgrad"]
        else None,
        center=random_bucket(size, dtype, device, seed=66) if with_center else None,
        step=torch.tensor(float(t), device=device),
    )
    ghat_coef, center_coef = LESAM_PLUS if with_center else (1.0, 0.0)
    return "adam_step_", tensors, dict(options, ghat_coef=ghat_coef, center_coef=center_coef)


CASES = {"sgd": sgd_case, "adam": adam_case}
# One case per op that touches every array (state, center) and one that touches the fewest.
FULL = {"sgd": "nesterov-decay", "adam": "adamw-amsgrad-maximize"}
BARE = {"sgd": "plain", "adam": "adam"}


def run(impl, case, offset=0, found_inf=0.0):
    """Run the case's op of backend ``impl`` on fresh copies of its tensors (buckets at ``offset``);
    returns the tensors after the call."""
    op, tensors, scalars = case
    device = tensors["param"].device
    args = {
        name: None if t is None else t.clone() if t.dim() == 0 else clone_at(t, offset) for name, t in tensors.items()
    }
    getattr(impl, op)(**args, found_inf=torch.tensor(found_inf, device=device), **scalars)
    return args


def check_against_spec(got, want, case, equal_nan=False):
    """The written tensors match the spec's (tolerance table); the read ones are untouched."""
    op, tensors, _ = case
    for name in ("param",) + STATE[op]:
        if tensors.get(name) is not None:
            tol = TOLERANCES[tensors[name].dtype]
            torch.testing.assert_close(
                got[name].double(),
                want[name].double(),
                **tol,
                equal_nan=equal_nan,
                msg=lambda m, name=name: f"{op} {name}: {m}",
            )
    for name in ("backup", "grad", "center", "step"):
        if tensors.get(name) is not None:
            assert_bits_equal(got[name], tensors[name], f"{op} must not write {name}")


# ---------------------------------------------------------------------- against the specification
@pytest.mark.parametrize("backend,device,size", targets_and_sizes())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("kind", ["full", "bare"])
@pytest.mark.parametrize("optimizer", list(CASES))
def test_base_update(backend, device, size, dtype, offset, kind, optimizer):
    """Sizes and alignment: every array the op can touch (state, center), or the fewest."""
    ops = resolve(backend, torch.device(device))
    name = (FULL if kind == "full" else BARE)[optimizer]
    case = CASES[optimizer](name, size, dtype, device, with_center=kind == "full")
    got = run(ops, case, offset)
    check_against_spec(got, run(spec, case, offset), case)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_center", [False, True], ids=["plain", "lesam-plus"])
@pytest.mark.parametrize("options", list(SGD_OPTIONS))
def test_sgd_options(backend, device, dtype, with_center, options):
    ops = resolve(backend, torch.device(device))
    case = sgd_case(options, 4099, dtype, device, with_center)
    check_against_spec(run(ops, case, offset=3), run(spec, case, offset=3), case)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_center", [False, True], ids=["plain", "lesam-plus"])
@pytest.mark.parametrize("options", list(ADAM_OPTIONS))
def test_adam_options(backend, device, dtype, with_center, options):
    ops = resolve(backend, torch.device(device))
    case = adam_case(options, 4099, dtype, device, with_center)
    check_against_spec(run(ops, case, offset=3), run(spec, case, offset=3), case)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("t", [1, 2, 100])
def test_adam_bias_corrections_in_float64(backend, device, t):
    """From w0 = 0 the fp32 result is the step itself, to a few fp32 roundings of the fp64 truth;
    bias corrections computed in fp32 (1 - 0.999^t) would be off by ~1e-5 at t = 1."""
    ops = resolve(backend, torch.device(device))
    options = dict(
        lr=1e-2,
        beta1=0.9,
        beta2=0.999,
        eps=1e-12,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        amsgrad=False,
        maximize=False,
        ghat_coef=1.0,
        center_coef=0.0,
    )
    g = random_bucket(1000, torch.float32, device, seed=70)
    tensors = dict(
        param=torch.ones_like(g),
        backup=torch.zeros_like(g),
        grad=g,
        exp_avg=g * 0.5,
        exp_avg_sq=g.square() * 0.5,
        max_exp_avg_sq=None,
        center=None,
        step=torch.tensor(float(t), device=device),
    )
    got = run(ops, ("adam_step_", tensors, options))
    truth = run(spec, ("adam_step_", {k: v if v is None else v.double() for k, v in tensors.items()}, options))
    torch.testing.assert_close(got["param"].double(), truth["param"], rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_lerp_is_exact_at_weight_one(backend, device, dtype):
    """beta1 = 0: torch's two-branch lerp(m, g, 1) is g exactly (a + 1 * (b - a) is not), so
    exp_avg becomes the gradient bit for bit. The spec does the same."""
    ops = resolve(backend, torch.device(device))
    op, tensors, scalars = adam_case("adam", 4099, dtype, device, with_center=False)
    for impl in (ops, spec):
        got = run(impl, (op, tensors, dict(scalars, beta1=0.0)), offset=3)
        assert_bits_equal(got["exp_avg"], tensors["grad"], f"{impl.NAME}: lerp(m, g, 1) must be g")


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", list(CASES))
def test_skipped_step(backend, device, dtype, optimizer):
    """found_inf set: w <- backup bit-exactly and no state written, even from a gradient with an
    inf in it (what makes a scaler skip). The spec does the same."""
    ops = resolve(backend, torch.device(device))
    case = CASES[optimizer](FULL[optimizer], 4099, dtype, device, with_center=True, regime="inf")
    op, tensors, _ = case
    for impl in (ops, spec):
        got = run(impl, case, offset=3, found_inf=1.0)
        assert_bits_equal(got["param"], tensors["backup"], f"{impl.NAME}: a skipped step restores w0 exactly")
        for name in STATE[op] + ("backup", "grad", "center"):
            assert_bits_equal(got[name], tensors[name], f"{impl.NAME}: a skipped step must not write {name}")


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("regime", ["nan", "inf"])
@pytest.mark.parametrize("optimizer", list(CASES))
def test_nonfinite_gradient_is_not_guarded(backend, device, regime, optimizer):
    """With found_inf = 0 the kernel computes what the spec computes, NaN and inf included: guarding
    against non-finite gradients is the caller's job (found_inf), not the kernel's."""
    ops = resolve(backend, torch.device(device))
    case = CASES[optimizer](FULL[optimizer], 4099, torch.float32, device, with_center=True, regime=regime)
    got = run(ops, case, offset=3)
    check_against_spec(got, run(spec, case, offset=3), case, equal_nan=True)
    assert not torch.isfinite(got["param"]).all(), "the non-finite gradient should have reached the weights"


def clones(tensors):
    return {name: None if t is None else t.clone() for name, t in tensors.items()}


@pytest.mark.parametrize("backend,device", [t for t in targets() if t.values[1] == "cuda"])
@pytest.mark.parametrize("optimizer", list(CASES))
def test_step_replays_in_a_cuda_graph(backend, device, optimizer):
    """found_inf and step are read on the device: the op captured once in a CUDA graph (capture
    fails on a host sync) and replayed through a skipped step and two taken ones, with the step
    count advanced on the device, gives the bits of the same op run eagerly."""
    ops = resolve(backend, torch.device(device))
    op, tensors, scalars = CASES[optimizer](FULL[optimizer], 4099, torch.float32, device, with_center=True)
    static, eager = clones(tensors), clones(tensors)
    found_inf = torch.zeros((), device=device)
    side = torch.cuda.Stream()  # warm-up on a side stream (torch's recipe; Triton compiles here)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        getattr(ops, op)(**clones(static), found_inf=found_inf, **scalars)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        getattr(ops, op)(**static, found_inf=found_inf, **scalars)
    for flag in (1.0, 0.0, 0.0):
        found_inf.fill_(flag)
        graph.replay()
        getattr(ops, op)(**eager, found_inf=torch.tensor(flag, device=device), **scalars)
        for name in ("param",) + STATE[op]:
            if static[name] is not None:
                assert_bits_equal(static[name], eager[name], f"{name} after the replay with found_inf={flag}")
        if "step" in static:
            static["step"] += 1
            eager["step"] += 1


# ---------------------------------------------------------------------- the spec against torch.optim
SPEC_TOLERANCES = {torch.float64: dict(rtol=1e-14, atol=1e-15), torch.float32: TOLERANCES[torch.float32]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_center", [False, True], ids=["plain", "lesam-plus"])
@pytest.mark.parametrize("options", [o for o in SGD_OPTIONS if o != "first-step"])
def test_sgd_spec_is_torch_sgd(dtype, with_center, options):
    """Five steps of spec.sgd_step_ (from w0 = the last weights) equal torch.optim.SGD's,
    weights and momentum buffer, with the LE-SAM+ gradient handed to torch as its gradient."""
    kwargs = {k: v for k, v in SGD_OPTIONS[options].items() if k != "init_buffer"}
    ghat_coef, center_coef = LESAM_PLUS if with_center else (1.0, 0.0)
    weights = random_bucket(500, dtype, "cpu", seed=80)
    torch_param = weights.clone().requires_grad_(True)
    torch_sgd = torch.optim.SGD([torch_param], foreach=False, **kwargs)
    buffer = torch.zeros_like(weights) if kwargs["momentum"] != 0 else None
    for k in range(5):
        ghat = random_bucket(500, dtype, "cpu", seed=81 + k)
        center = random_bucket(500, dtype, "cpu", seed=91 + k) if with_center else None
        torch_param.grad = ghat * ghat_coef - center * center_coef if with_center else ghat.clone()
        torch_sgd.step()
        backup = weights.clone()
        spec.sgd_step_(
            weights,
            backup,
            ghat,
            buffer,
            center,
            torch.zeros(()),
            init_buffer=k == 0,
            ghat_coef=ghat_coef,
            center_coef=center_coef,
            **kwargs,
        )
        torch.testing.assert_close(weights, torch_param.detach(), **SPEC_TOLERANCES[dtype])
        if buffer is not None:
            torch.testing.assert_close(
                buffer, torch_sgd.state[torch_param]["momentum_buffer"], **SPEC_TOLERANCES[dtype]
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_center", [False, True], ids=["plain", "lesam-plus"])
@pytest.mark.parametrize("options", [o for o in ADAM_OPTIONS if o != "late-step"])
def test_adam_spec_is_torch_adam(dtype, with_center, options):
    """Five steps of spec.adam_step_ equal torch.optim.Adam's (AdamW's when decoupled),
    weights and every state tensor."""
    _, kwargs = ADAM_OPTIONS[options]
    kwargs = dict(kwargs)
    ghat_coef, center_coef = LESAM_PLUS if with_center else (1.0, 0.0)
    weights = random_bucket(500, dtype, "cpu", seed=100)
    torch_param = weights.clone().requires_grad_(True)
    torch_class = torch.optim.AdamW if kwargs["decoupled_weight_decay"] else torch.optim.Adam
    torch_adam = torch_class(
        [torch_param],
        lr=kwargs["lr"],
        betas=(kwargs["beta1"], kwargs["beta2"]),
        eps=kwargs["eps"],
        weight_decay=kwargs["weight_decay"],
        amsgrad=kwargs["amsgrad"],
        maximize=kwargs["maximize"],
        foreach=False,
    )
    exp_avg, exp_avg_sq = torch.zeros_like(weights), torch.zeros_like(weights)
    max_exp_avg_sq = torch.zeros_like(weights) if kwargs["amsgrad"] else None
    step = torch.zeros(())
    for k in range(5):
        ghat = random_bucket(500, dtype, "cpu", seed=101 + k)
        center = random_bucket(500, dtype, "cpu", seed=111 + k) if with_center else None
        torch_param.grad = ghat * ghat_coef - center * center_coef if with_center else ghat.clone()
        torch_adam.step()
        step += 1  # the caller advances the step count before the update, as torch does
        backup = weights.clone()
        spec.adam_step_(
            weights,
            backup,
            ghat,
            exp_avg,
            exp_avg_sq,
            max_exp_avg_sq,
            center,
            step,
            torch.zeros(()),
            ghat_coef=ghat_coef,
            center_coef=center_coef,
            **kwargs,
        )
        state = torch_adam.state[torch_param]
        tol = SPEC_TOLERANCES[dtype]
        torch.testing.assert_close(weights, torch_param.detach(), **tol)
        torch.testing.assert_close(exp_avg, state["exp_avg"], **tol)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], **tol)
        if max_exp_avg_sq is not None:
            torch.testing.assert_close(max_exp_avg_sq, state["max_exp_avg_sq"], **tol)


# ---------------------------------------------------------------------- registration
def opcheck_samples(ops, device):
    """(op, args) covering each op's instantiations: state or none, center or none, two dtypes."""
    samples = []
    for dtype in (torch.float32, torch.bfloat16):
        for optimizer, name in (
            ("sgd", "plain"),
            ("sgd", "nesterov-decay"),
            ("adam", "adam"),
            ("adam", "adamw-amsgrad-maximize"),
        ):
            for with_center in (False, True):
                op, tensors, scalars = CASES[optimizer](name, 300, dtype, device, with_center)
                args = dict(tensors, found_inf=torch.zeros((), device=device), **scalars)
                samples.append((getattr(ops, op), args))
    return samples


@pytest.mark.parametrize("backend,device", targets())
def test_opcheck(backend, device):
    """torch.library.opcheck: schema (mutations declared), autograd registration, and (where fake
    tensors can run) the fake kernels and AOT dispatch, what torch.compile goes through."""
    ops = resolve(backend, torch.device(device))
    checks = ("test_schema", "test_autograd_registration")
    if any(t.values[:2] == (backend, device) for t in TRACEABLE):
        checks += ("test_faketensor", "test_aot_dispatch_dynamic")
    for op, kwargs in opcheck_samples(ops, device):
        torch.library.opcheck(op, (), kwargs, test_utils=checks)
