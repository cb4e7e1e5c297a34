"""Momentum-SAM (FusedSAM(momentum_sam=True), fused_lesam/momentum_sam.py).

Against an fp64 per-tensor reference written here (w~ = w - rho v / (||v|| + 1e-12) with v torch's
own SGD momentum buffer or Adam's exp_avg, the gradient of a tiny model at w~, then torch's step from
w), on the torch and cpp backends in fp64; the fp32 kernels of cpp and Triton (its interpreter)
against the torch backend; the perturb op's signed radius on every CPU backend; the restore, the
skip of a non-finite pass, GradScaler, checkpoints, and every refusal.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import ddp_cases
from helpers.asserts import assert_bits_equal, assert_close
from helpers.models import through_bytes
from helpers.op_cases import random_bucket, targets
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, available_backends
from fused_lesam.backends import resolve, spec

BACKENDS = [b for b in ("torch", "cpp", "triton") if not available_backends()[b]]
STEPS = 12
RHO = 0.3

BASES = {
    "momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    "dampening-maximize": (torch.optim.SGD, dict(lr=0.02, momentum=0.8, dampening=0.3, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.05, betas=(0.8, 0.99))),
}
MOMENTUM = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg", torch.optim.AdamW: "exp_avg"}


class Net(nn.Module):
    """Linear, tanh, linear; ``sometimes`` takes part at steps 1, 4, 7, ... only, ``unused`` never."""

    def __init__(self, dtype):
        super().__init__()
        self.body = nn.Linear(5, 6, dtype=dtype)
        self.head = nn.Linear(6, 3, dtype=dtype)
        self.sometimes = nn.Linear(6, 3, bias=False, dtype=dtype)
        self.unused = nn.Linear(2, 2, dtype=dtype)

    def forward(self, x, t):
        h = torch.tanh(self.body(x))
        out = self.head(h)
        return out + self.sometimes(h) if t % 3 == 1 else out


def make_net(dtype=torch.float64):
    torch.manual_seed(0)
    return Net(dtype)


def batches(dtype=torch.float64, n=STEPS):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def loss_at(model, x, y, t):
    return F.cross_entropy(model(x, t), y)


def zero_grads(model, style):
    """The reference's zeroing, as the optimizer run zeroes: in place (the grads stay, zero) or to None."""
    for p in model.parameters():
        if style == "none":
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()


def reference_run(model, config, style="in-place", rho=RHO, max_grad_norm=None):
    """fp64 per-tensor Momentum-SAM with torch's optimizer (foreach=False) on a copy of ``model``:
    per step the perturbed point w~ (where the pass ran) and the parameters after the step."""
    base_cls, hyper = BASES[config]
    model = copy.deepcopy(model).double()
    params = list(model.parameters())
    base = base_cls(params, foreach=False, **hyper)
    points, after = [], []
    for t, (x, y) in enumerate(batches()):
        v = [base.state[p].get(MOMENTUM[base_cls], torch.zeros_like(p)) for p in params]
        norm = math.sqrt(sum(float((m * m).sum()) for m in v))
        scale = rho / (norm + 1e-12) if norm > 0 else 0.0  # no momentum yet: a plain step
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, m in zip(params, v):
                p.sub_(m * scale)
        points.append([p.detach().clone() for p in params])
        zero_grads(model, style)
        loss_at(model, x.double(), y, t).backward()
        with torch.no_grad():
            if max_grad_norm is not None:  # torch.nn.utils.clip_grad_norm_'s rule
                grads = [p.grad for p in params if p.grad is not None]
                total = math.sqrt(sum(float((g * g).sum()) for g in grads))
                for g in grads:
                    g.mul_(min(1.0, max_grad_norm / (total + 1e-6)))
            for p, saved in zip(params, w):
                p.copy_(saved)
        base.step()
        after.append([p.detach().clone() for p in params])
    return points, after


def msam(model, config, backend, **extra):
    base_cls, hyper = BASES[config]
    return FusedSAM(model.parameters(), base_cls, rho=RHO, momentum_sam=True, backend=backend, **hyper, **extra)


def run(model, opt, api="two-step", style="in-place", dtype=torch.float64, max_grad_norm=None):
    """Momentum-SAM steps through ``api``: per step the point where the pass ran and the parameters after."""
    points, after, losses = [], [], []

    def backward(x, y, t):
        points.append([p.detach().clone() for p in model.parameters()])
        if style == "none":
            model.zero_grad(set_to_none=True)
        loss = loss_at(model, x, y, t)
        loss.backward()
        losses.append(loss)
        return loss

    for t, (x, y) in enumerate(batches(dtype)):
        if api == "two-step":
            opt.first_step(zero_grad=True)
            backward(x, y, t)
            opt.second_step(zero_grad=True, max_grad_norm=max_grad_norm)
        elif api == "closure":
            loss = opt.step(lambda: backward(x, y, t), max_grad_norm=max_grad_norm)
            assert len(losses) == t + 1, "step(closure) must call the closure once: the one pass"
            assert loss is losses[-1], "step(closure) returns the closure's loss"
        else:
            with opt.perturbed(max_grad_norm=max_grad_norm):
                backward(x, y, t)
        after.append([p.detach().clone() for p in model.parameters()])
    return points, after


def assert_runs_close(got, want, dtype):
    for t, (mine, theirs) in enumerate(zip(got, want)):
        for i, (p, q) in enumerate(zip(mine, theirs)):
            assert_close(p, q, dtype, msg=f"step {t}, parameter {i}")


# ---------------------------------------------------------------------- the maths
@pytest.mark.parametrize("config", list(BASES))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # fp64 on triton is the spec
def test_matches_the_fp64_reference(config, backend):
    model = make_net()
    want_points, want_after = reference_run(model, config)
    got_points, got_after = run(model, msam(model, config, backend))
    assert_runs_close(got_points, want_points, torch.float64)
    assert_runs_close(got_after, want_after, torch.float64)
    # The first step is a plain step (no momentum yet); later ones are perturbed.
    first = make_net()
    assert all(torch.equal(p, q) for p, q in zip(got_points[0], first.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(got_points[1], got_after[0]))


@pytest.mark.parametrize("api", ["two-step", "closure", "perturbed"])
@pytest.mark.parametrize("style", ["in-place", "none"])
def test_every_api_and_zeroing_matches_the_reference(api, style):
    """``none``: ``sometimes`` has no gradient at some steps but momentum from earlier ones, so it
    is perturbed and must be restored though the fused update does not touch it."""
    model = make_net()
    want_points, want_after = reference_run(model, "adamw", style)
    got_points, got_after = run(model, msam(model, "adamw", "torch"), api, style)
    assert_runs_close(got_points, want_points, torch.float64)
    assert_runs_close(got_after, want_after, torch.float64)


def test_max_grad_norm_clips_the_one_gradient():
    model = make_net()
    want = reference_run(model, "momentum", max_grad_norm=0.05)[1]
    got = run(model, msam(model, "momentum", "cpp"), max_grad_norm=0.05)[1]
    assert_runs_close(got, want, torch.float64)
    unclipped = reference_run(model, "momentum")[1]
    assert not torch.allclose(unclipped[-1][0], want[-1][0]), "the clipping must change the run"


@pytest.mark.parametrize("config", ["momentum", "adamw"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_fp32_kernels_match_the_spec(config, backend):
    model = make_net(torch.float32)
    spec_model = copy.deepcopy(model)
    got = run(model, msam(model, config, backend), dtype=torch.float32)
    want = run(spec_model, msam(spec_model, config, "torch"), dtype=torch.float32)
    assert_runs_close(got[0], want[0], torch.float32)
    assert_runs_close(got[1], want[1], torch.float32)


@pytest.mark.parametrize("backend,device", [pytest.param("torch", "cpu", id="torch"), *targets()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_perturb_op_takes_a_signed_radius(backend, device, dtype):
    """sigma = inf, rho_max = -rho: w - rho v / (||v|| + 1e-12), rho_t = -rho, on every backend as in
    the spec; a zero v leaves w as it is."""
    ops = resolve(backend, torch.device(device))
    w = random_bucket(3000, dtype, device, seed=3)
    v = random_bucket(3000, dtype, device, seed=4)
    for direction in (v, torch.zeros_like(v)):
        sq = spec.sq_norm([direction], [None])
        param, backup = w.clone(), torch.full_like(w, 7.0)
        rho = ops.perturb_(param, direction, backup, sq, math.inf, -0.7, 1.0, False)
        assert_bits_equal(backup, w)
        assert rho.item() == pytest.approx(-0.7)
        if not sq:
            assert_bits_equal(param, w, "no momentum, no perturbation")
            continue
        want_param = w.clone()
        want_rho = spec.perturb_(want_param, direction, None, sq, math.inf, -0.7, 1.0, False)
        assert_close(param, want_param, dtype)
        assert_close(rho, want_rho)
        # and the direction is -v: against the exact perturbation, within the dtype's tolerance
        assert_close(param, w.double() - 0.7 * v.double() / v.double().norm(), dtype)


def test_a_gradient_present_at_first_step_is_not_used():
    """first_step() without zero_grad: a gradient left at w (a first backward out of habit) is zeroed,
    else the pass's backward would add to it."""
    model, opt = trained()
    other, ref = trained()
    x, y = batches()[3]
    loss_at(model, x, y, 3).backward()
    opt.first_step()
    loss_at(model, x, y, 3).backward()
    opt.second_step()
    ref.step(lambda: loss_at(other, x, y, 3).backward())
    assert_snapshot_equal(snapshot(model, opt), snapshot(other, ref), "the same step")


def test_a_step_of_torch_s_own_is_taken_into_the_momentum():
    """A tensor lr given between first_step and second_step: that step is torch's own (the fused
    update's fallback), which starts ``sometimes``' momentum outside the flat buffers; the next
    perturbation must read it."""
    model = make_net()
    opt = msam(model, "momentum", "cpp")
    want_points, want_after = reference_run(model, "momentum", "none")
    got_points, got_after = [], []
    for t, (x, y) in enumerate(batches(n=4)):
        opt.first_step()
        got_points.append([p.detach().clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        loss_at(model, x, y, t).backward()
        if t == 1:
            opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=torch.float64)
        opt.second_step()
        opt.param_groups[0]["lr"] = 0.05
        got_after.append([p.detach().clone() for p in model.parameters()])
    assert opt.base_update == "fused"
    assert_runs_close(got_points, want_points[:4], torch.float64)
    assert_runs_close(got_after, want_after[:4], torch.float64)


# ---------------------------------------------------------------------- the step's protocols
def trained(config="momentum", steps=3, backend="cpp", dtype=torch.float64, **extra):
    """A model and its Momentum-SAM optimizer after ``steps`` steps: the momentum is not zero."""
    model = make_net(dtype)
    opt = msam(model, config, backend, **extra)
    for t, (x, y) in enumerate(batches(dtype, steps)):
        opt.step(lambda: loss_at(model, x, y, t).backward())
    return model, opt


def snapshot(model, opt):
    state = [t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()], state


def assert_snapshot_equal(got, want, what):
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert_bits_equal(a, b, what)


def test_telemetry_reports_the_norm_of_v_and_the_signed_radius():
    model, opt = trained("adam")
    v = [state["exp_avg"].double() for state in opt.state.values()]
    exact = math.sqrt(math.fsum(float((m * m).sum()) for m in v))
    opt.first_step()
    assert opt.last_grad_norm.item() == pytest.approx(exact, rel=1e-6)
    assert opt.last_rho.tolist() == [pytest.approx(-RHO)]
    loss_at(model, *batches()[3], 3).backward()
    opt.second_step()


def test_an_exception_in_the_pass_restores_w_bit_exactly():
    model, opt = trained()
    before = snapshot(model, opt)
    with pytest.raises(KeyboardInterrupt):
        with opt.perturbed():
            moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before[0])]
            assert sum(moved) >= 4, "the parameters with momentum are perturbed"
            raise KeyboardInterrupt
    assert_snapshot_equal(snapshot(model, opt), before, "restored bit for bit, nothing updated")
    assert not opt._progress.perturbed


@pytest.mark.parametrize("config", ["momentum", "adam"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_skipped_and_counted(config, bad):
    model, opt = trained(config)
    before = snapshot(model, opt)
    x, y = batches()[3]

    def closure():
        loss_at(model, x, y, 3).backward()
        model.head.weight.grad[0, 0] = bad

    opt.step(closure)
    assert_snapshot_equal(snapshot(model, opt), before, "a skipped step writes no parameter and no state")
    assert int(opt.skipped_steps) == 1
    opt.step(lambda: loss_at(model, x, y, 3).backward())  # and the run goes on
    assert int(opt.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.head.weight, before[0][2])


@pytest.mark.parametrize("how", ["step", "second_step", "unscaled-by-the-user"])
def test_grad_scaler_unscales_the_one_pass_once(how):
    """A power-of-two scale: the scaled run equals the unscaled one bit for bit. (Not through
    ``scaler.step(opt, closure)``: its first call asserts that scale() ran before, and here the
    closure is the only pass.)"""
    model, plain = make_net(torch.float32), make_net(torch.float32)
    opt, ref = msam(model, "adamw", "cpp"), msam(plain, "adamw", "cpp")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for t, (x, y) in enumerate(batches(torch.float32, 5)):
        if how == "step":
            opt.step(lambda: scaler.scale(loss_at(model, x, y, t)).backward(), grad_scaler=scaler)
        else:
            opt.first_step()
            scaler.scale(loss_at(model, x, y, t)).backward()
            if how == "unscaled-by-the-user":
                scaler.unscale_(opt)  # as for clipping in a one-pass loop
            opt.second_step(grad_scaler=scaler)
        scaler.update()
        ref.step(lambda: loss_at(plain, x, y, t).backward())
    for p, q in zip(model.parameters(), plain.parameters()):
        assert_bits_equal(p.detach(), q.detach())
    assert scaler.get_scale() == 2.0**10 and int(opt.skipped_steps) == 0


def test_grad_scaler_overflow_skips_and_backs_off():
    model, opt = trained("adamw", dtype=torch.float32)
    before = snapshot(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, backoff_factor=0.5)
    x, y = batches(torch.float32)[3]

    def closure():
        scaler.scale(loss_at(model, x, y, 3)).backward()
        model.body.weight.grad[0, 0] = float("inf")  # as an fp16 overflow of the scaled gradient

    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    assert_snapshot_equal(snapshot(model, opt), before, "an overflow writes nothing")
    assert int(opt.skipped_steps) == 1 and scaler.get_scale() == 2.0**3


def one_pass(model, x, y, t):
    """A closure that drops the gradients first: a fresh model's are None, so the straight run's must be too."""

    def closure():
        model.zero_grad(set_to_none=True)
        loss_at(model, x, y, t).backward()

    return closure


@pytest.mark.parametrize("config", ["nesterov", "adamw"])
def test_checkpoint_resume_is_bit_identical(config):
    straight = make_net()
    opt = msam(straight, config, "cpp")
    resumed = make_net()
    first = msam(resumed, config, "cpp")
    data = batches()
    for t, (x, y) in enumerate(data):
        opt.step(one_pass(straight, x, y, t))
        if t < 5:
            first.step(one_pass(resumed, x, y, t))
    saved = through_bytes({"model": resumed.state_dict(), "opt": first.state_dict()})
    resumed = make_net()
    resumed.load_state_dict(saved["model"])
    second = msam(resumed, config, "cpp")
    second.load_state_dict(saved["opt"])
    for t, (x, y) in enumerate(data[5:], start=5):
        second.step(one_pass(resumed, x, y, t))
    assert_snapshot_equal(snapshot(resumed, second), snapshot(straight, opt), "resumed bit-identically")


def test_capturable_steps_as_the_default_does():
    got = trained("adamw", steps=6, capturable=True)
    want = trained("adamw", steps=6)
    assert_snapshot_equal(snapshot(*got), snapshot(*want), "capturable=True computes the same step")
    assert int(got[1]._device_count) == 6


@pytest.mark.parametrize("api", ["two-step", "closure"])
def test_hooks_and_schedulers_see_one_step_per_step(api):
    model = make_net()
    opt = msam(model, "momentum", "cpp")
    fired = []
    opt.register_step_pre_hook(lambda *_: fired.append("pre"))
    opt.register_step_post_hook(lambda *_: fired.append("post"))
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t, (x, y) in enumerate(batches(n=3)):
        if api == "two-step":
            opt.first_step()
            loss_at(model, x, y, t).backward()
            opt.second_step()
        else:
            opt.step(lambda: loss_at(model, x, y, t).backward())
        schedule.step()
    assert fired == ["pre", "post"] * 3
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 8)


def ddp_train(model, opt, rank=0, world=1):
    """Momentum-SAM steps on the DDP cases' data, each rank on its slice of every batch; w after each."""
    history = []
    for x, y in ddp_cases.batches():
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.step(lambda: F.cross_entropy(model(xs), ys).backward())
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _ddp_rank(rank, out):
    from test_distributed import WORLD, process_group

    with process_group(rank, out):
        model = DistributedDataParallel(ddp_cases.mlp())
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, momentum_sam=True)
        torch.save(dict(history=ddp_train(model, opt, rank, WORLD), norm=opt.last_grad_norm), f"{out}/rank{rank}.pt")


def test_ddp_ranks_take_the_whole_batch_step(tmp_path):
    """Two ranks (gloo) with half a batch each: every rank holds the same v, so ||v|| is the global
    norm, and the run equals the single process on the whole batch."""
    mp.spawn(_ddp_rank, args=(str(tmp_path),), nprocs=2, join=True)
    model = ddp_cases.mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=RHO, momentum_sam=True)
    expected = ddp_train(model, opt)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_runs_close(got["history"], expected, torch.float32)
        assert_close(got["norm"], opt.last_grad_norm)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "base,hyper,extra,match",
    [
        (torch.optim.Adagrad, dict(lr=0.1), {}, "Adagrad is not torch.optim.SGD, Adam or AdamW"),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(base_update="generic"), "base_update='generic'"),
        (torch.optim.SGD, dict(lr=0.1), {}, "momentum=0"),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9), dict(adaptive=True), "adaptive=True with momentum_sam"),
        (torch.optim.SGD, dict(lr=torch.tensor(0.1), momentum=0.9), {}, "lr is a Tensor"),
        (torch.optim.Adam, dict(lr=0.1, differentiable=True), {}, "differentiable=True"),
    ],
    ids=["adagrad", "generic", "no-momentum", "adaptive", "tensor-lr", "differentiable"],
)
def test_refused_where_there_is_no_flat_momentum(base, hyper, extra, match):
    with pytest.raises(ValueError, match=match):
        FusedSAM(make_net().parameters(), base, momentum_sam=True, **hyper, **extra)


@pytest.mark.parametrize("mode", [dict(sam_interval=2), dict(sam_start=3), dict(look_k=5)], ids=str)
def test_the_interval_options_are_refused(mode):
    # Momentum-SAM is one pass per step already; the options choose which steps pay SAM's second pass.
    with pytest.raises(ValueError, match="already takes one forward/backward per step"):
        FusedSAM(make_net().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, momentum_sam=True, **mode)


def test_a_group_without_momentum_is_refused():
    model = make_net()
    groups = [{"params": model.body.parameters()}, {"params": model.head.parameters(), "momentum": 0.0}]
    with pytest.raises(ValueError, match="param group 1 has momentum=0"):
        FusedSAM(groups, torch.optim.SGD, lr=0.1, momentum=0.9, momentum_sam=True)


def test_sharded_parameters_are_refused(monkeypatch):
    """FSDP2's buckets make fused_kind refuse (tests/test_base_update.py); the refusal carries its reason."""
    import fused_lesam.engine

    monkeypatch.setattr(
        fused_lesam.engine, "fused_kind", lambda *_: (None, "sharded (FSDP2) parameters keep torch's own step")
    )
    with pytest.raises(ValueError, match=r"needs the fused base update.*sharded \(FSDP2\)"):
        FusedSAM(make_net().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, momentum_sam=True)


def test_a_fallback_mid_run_is_refused_before_anything_changes():
    model, opt = trained()
    before = snapshot(model, opt)
    opt.param_groups[0]["lr"] = torch.tensor(0.05)  # torch allows it; the fused update does not
    with pytest.raises(RuntimeError, match="fused base update cannot take this step .lr is a Tensor"):
        opt.first_step()
    assert_snapshot_equal(snapshot(model, opt), before, "nothing changed")
    assert not opt._progress.perturbed
    opt.param_groups[0]["momentum"] = 0.0  # a scheduler's doing, say
    opt.param_groups[0]["lr"] = 0.05
    with pytest.raises(RuntimeError, match="momentum=0"):
        opt.first_step()


def test_a_local_first_pass_is_refused():
    class Ddp(nn.Module):  # what local_first_pass needs of a DDP model
        def no_sync(self):
            return contextlib.nullcontext()

    model, opt = trained()
    with opt.local_first_pass(Ddp()):
        pass
    with pytest.raises(RuntimeError, match="Momentum-SAM has no first backward"):
        opt.first_step()


@pytest.mark.parametrize("cls", [FusedLESAM, FusedXSAM])
def test_lesam_and_xsam_refuse_the_option(cls):
    with pytest.raises(TypeError, match=r"FusedSAM\(momentum_sam=True"):
        cls(make_net().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, momentum_sam=True)


def test_momentum_sam_must_be_a_bool():
    with pytest.raises(ValueError, match="momentum_sam"):
        FusedSAM(make_net().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, momentum_sam="yes")
