"""The recipes in examples/ run on the real frameworks (installed by ./dev: Lightning, transformers,
accelerate, timm) for a few steps of a tiny model on synthetic data, and each takes exactly the
steps of a plain PyTorch loop with the same optimizer, `opt.step(closure)`, the same seeds and data.

Where the recipe's arithmetic is the plain loop's, operation for operation, the parameters (and
BatchNorm's buffers) are compared bit for bit. The one exception is said where it is made."""

import contextlib
import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fused_lesam import frozen_bn_stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
# The frameworks are test dependencies (./dev installs them into its venvs): a missing one fails
# here. An existing interpreter (FUSED_LESAM_PYTHON, e.g. the GPU machine's, which reaches no
# package registry) is taken as it is: without them these tests are skipped there, and only there.
if os.environ.get("FUSED_LESAM_PYTHON"):
    for framework in ("lightning", "transformers", "accelerate", "timm"):
        pytest.importorskip(framework, reason=f"{framework} is not in FUSED_LESAM_PYTHON's interpreter")
import lightning_lesam as lightning_recipe  # noqa: E402

STEPS = 4
pytestmark = pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"
)  # Lightning's, on torch 2.14


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a shared 2-core machine torch's two intra-op threads wait on each other for
    most of a step (a timm ResNet's forward took 1-3 s with two, 20-40 ms with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Parameters and buffers (BatchNorm's running statistics) equal bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), (
            f"{name}: max difference {(sa[name].float() - sb[name].float()).abs().max()}"
        )


def assert_trained(model: torch.nn.Module, init: torch.nn.Module) -> None:
    """A guard against comparing two runs that did nothing."""
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters()))


# ---------------------------------------------------------------------- PyTorch Lightning
def lightning_plain_loop(model, loader, steps, bf16=False, max_grad_norm=None, frozen_bn=False):
    """The same optimizer, scheduler and batches in a plain loop: first backward by hand, closure for the second."""
    opt = lightning_recipe.make_optimizer(model.parameters())
    sched = lightning_recipe.make_scheduler(opt)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    for (x, y), _ in zip(loader, range(steps)):
        with autocast():
            loss = F.cross_entropy(model(x), y)
        loss.backward()

        def closure():
            with autocast(), frozen_bn_stats(model) if frozen_bn else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            loss.backward()

        opt.step(closure, max_grad_norm=max_grad_norm)
        opt.zero_grad()
        sched.step()
    return model


@pytest.mark.parametrize("precision, max_grad_norm", [("32-true", None), ("32-true", 0.05), ("bf16-mixed", None)])
def test_lightning_automatic_optimization(precision, max_grad_norm):
    """An unchanged LightningModule but for configure_optimizers: Lightning's closure (training_step,
    zero_grad, backward) runs for both passes; the LR scheduler steps per step; bf16 autocast; the
    final gradient clipped through the step (max_grad_norm 0.05 is below every gradient norm here)."""
    loader = lightning_recipe.synthetic_loader(batches=STEPS)
    init = lightning_recipe.small_cnn(batchnorm=False)
    module = lightning_recipe.LESAMClassifier(copy.deepcopy(init), max_grad_norm=max_grad_norm)
    trainer = lightning_recipe.train(module, loader, STEPS, precision=precision)
    assert trainer.global_step == STEPS
    opt = trainer.optimizers[0]
    assert opt._progress.count == STEPS and float(opt.last_rho[0]) > 0  # perturbed: a real LE-SAM step
    reference = lightning_plain_loop(
        copy.deepcopy(init), loader, STEPS, bf16=precision == "bf16-mixed", max_grad_norm=max_grad_norm
    )
    assert_same_state(module.model, reference)
    assert_trained(module.model, init)
    if max_grad_norm is not None:  # the clipping took part: the unclipped run differs
        unclipped = lightning_plain_loop(copy.deepcopy(init), loader, STEPS)
        assert any(not torch.allclose(p, q) for p, q in zip(reference.parameters(), unclipped.parameters()))


@pytest.mark.parametrize("closure_form", [False, True], ids=["first_step-then-step", "step-closure"])
def test_lightning_manual_optimization(closure_form):
    """first_step, manual_backward under frozen_bn_stats, opt.step() (or opt.step(closure)): the
    plain loop's steps, BatchNorm's running statistics included, and Lightning counts every step."""
    loader = lightning_recipe.synthetic_loader(batches=STEPS)
    init = lightning_recipe.small_cnn(batchnorm=True)
    module = lightning_recipe.ManualLESAMClassifier(copy.deepcopy(init), closure_form=closure_form)
    trainer = lightning_recipe.train(module, loader, STEPS)
    assert trainer.global_step == STEPS
    assert trainer.optimizers[0]._progress.count == STEPS
    reference = lightning_plain_loop(copy.deepcopy(init), loader, STEPS, frozen_bn=True)
    assert_same_state(module.model, reference)
    assert_trained(module.model, init)


def test_lightning_automatic_refuses_gradient_accumulation():
    module = lightning_recipe.LESAMClassifier(lightning_recipe.small_cnn(batchnorm=False))
    with pytest.raises(RuntimeError, match="accumulate_grad_batches > 1 splits LE-SAM's two passes"):
        lightning_recipe.train(module, lightning_recipe.synthetic_loader(), STEPS, accumulate_grad_batches=2)


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*AMP with fp16 is not supported on CPU")
def test_lightning_what_the_recipe_says_of_clipping_and_fp16():
    """bf16-mixed with gradient_clip_val: Lightning refuses it for this optimizer (it does the GradScaler's
    unscaling itself). Lightning's fp16 plugin (a MixedPrecision plugin with a GradScaler, here on
    the CPU) runs the closure itself and calls scaler.step(optimizer) without it: refused, with the
    parameters left as they were. On a CPU, precision="16-mixed" becomes "bf16-mixed"."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = lightning_recipe.LESAMClassifier(lightning_recipe.small_cnn(batchnorm=False))
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        lightning_recipe.train(
            module, lightning_recipe.synthetic_loader(), STEPS, precision="bf16-mixed", gradient_clip_val=1.0
        )
    init = lightning_recipe.small_cnn(batchnorm=False)
    module = lightning_recipe.LESAMClassifier(copy.deepcopy(init))
    fp16 = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(RuntimeError, match=r"needs a closure.*With a GradScaler"):
        lightning_recipe.train(module, lightning_recipe.synthetic_loader(), STEPS, precision=None, plugins=[fp16])
    assert_same_state(module.model, init)
    import lightning as L

    assert L.Trainer(accelerator="cpu", precision="16-mixed", logger=False).precision == "bf16-mixed"


# ---------------------------------------------------------------------- Hugging Face Trainer
import hf_trainer_lesam as hf_recipe  # noqa: E402


def record_inputs(model):
    """Every forward's inputs, in order (the Trainer's sampler shuffles: the plain loop replays its batches)."""
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["x"].clone(), kwargs["labels"].clone())), with_kwargs=True
    )
    return seen


@pytest.mark.parametrize("accumulation, max_grad_norm", [(2, 0.5), (1, 0.0)], ids=["accumulate2-clip", "plain"])
def test_hf_trainer(tmp_path, accumulation, max_grad_norm):
    """LESAMTrainer with the Trainer's gradient accumulation, its clipping of the final gradient and
    its linear LR schedule with warm-up, AdamW (fused) as the base: the plain loop's steps on the
    batches the Trainer drew, bit for bit."""
    from transformers import get_scheduler

    from fused_lesam import FusedLESAM

    init = hf_recipe.TinyClassifier()
    model = copy.deepcopy(init)
    seen = record_inputs(model)
    args = hf_recipe.arguments(
        str(tmp_path), STEPS, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm
    )
    trainer = hf_recipe.LESAMTrainer(
        model=model, args=args, train_dataset=hf_recipe.synthetic_dataset(), lesam=hf_recipe.LESAM
    )
    trainer.train()
    opt = trainer.optimizer.optimizer
    assert isinstance(opt, FusedLESAM) and isinstance(opt.base, torch.optim.AdamW)
    assert opt._progress.count == STEPS and trainer.state.global_step == STEPS

    # Each step: the window's micro-batches at w, then the same ones again at w + eps.
    k = accumulation
    assert len(seen) == STEPS * 2 * k
    windows = [seen[s * 2 * k : (s + 1) * 2 * k] for s in range(STEPS)]
    for window in windows:
        for (x1, y1), (x2, y2) in zip(window[:k], window[k:]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == STEPS
    if max_grad_norm:
        assert min(norms) > max_grad_norm  # the Trainer's clipping took part in every step

    # The plain loop: the Trainer's param groups (decay on the Linear weights only), its base, schedule.
    reference = copy.deepcopy(init)
    net = reference.net
    decay = [net[0].weight, net[3].weight]
    no_decay = [net[0].bias, net[1].weight, net[1].bias, net[3].bias]
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    ref_opt = FusedLESAM(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        base=torch.optim.AdamW,
        lr=args.learning_rate,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=True,
        **hf_recipe.LESAM,
    )
    sched = get_scheduler("linear", ref_opt, num_warmup_steps=args.warmup_steps, num_training_steps=STEPS)
    for window in windows:

        def accumulate(clip=False):
            for x, y in window[:k]:
                (reference(x=x, labels=y)["loss"] / k).backward()
            if clip and max_grad_norm:  # the final gradient, clipped at the end of the closure (README)
                torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)

        accumulate()
        ref_opt.step(lambda: accumulate(clip=True))
        sched.step()
        ref_opt.zero_grad()
    assert_same_state(model, reference)
    assert_trained(model, init)


# ---------------------------------------------------------------------- accelerate, timm
import accelerate_timm_lesam as accelerate_recipe  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (the HF Trainer makes
    one too): each test starts from none, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_accelerate_with_a_timm_model_and_scheduler(mixed_precision):
    """Accelerator.prepare(model, optimizer, loader), accelerator.backward in both passes,
    optimizer.step(closure) through accelerate's wrapper, timm's ResNet (BatchNorm frozen in the
    second pass) and its cosine scheduler with warm-up: the plain loop's steps bit for bit.
    accelerate's bf16 is autocast around the model's forward with the outputs cast to fp32."""
    from fused_lesam import FusedLESAM

    init = accelerate_recipe.make_model()
    loader = accelerate_recipe.synthetic_loader()
    model = accelerate_recipe.train(copy.deepcopy(init), loader, STEPS, mixed_precision=mixed_precision)

    reference = copy.deepcopy(init)
    opt = FusedLESAM(reference.parameters(), **accelerate_recipe.OPTIMIZER)
    sched = accelerate_recipe.make_scheduler(opt, STEPS)
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mixed_precision == "bf16" else contextlib.nullcontext
    )
    reference.train()
    for step, (x, y) in zip(range(STEPS), loader):

        def loss_at():
            with autocast():
                logits = reference(x)
            return F.cross_entropy(logits.float(), y)

        loss_at().backward()

        def closure():
            with frozen_bn_stats(reference):
                loss_at().backward()

        opt.step(closure)
        opt.zero_grad()
        sched.step_update(num_updates=step + 1)
    assert_same_state(model, reference)
    assert_trained(model, init)
    assert any(not torch.equal(a, b) for a, b in zip(model.buffers(), init.buffers()))  # BatchNorm's statistics moved


@pytest.mark.filterwarnings("ignore:GradScaler is going to stop passing itself:FutureWarning")
def test_accelerate_fp16_wrapper_is_refused_and_the_recipe_workaround_steps():
    """accelerate's fp16 path (its optimizer wrapper with a GradScaler, here a CPU one): the scaler
    cannot pass itself through the wrapper, which FusedLESAM refuses before changing anything; the
    optimizer itself with grad_scaler= steps."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from fused_lesam import FusedLESAM

    Accelerator(cpu=True)  # the process-wide state the wrapper reads
    model = accelerate_recipe.make_model()
    before = copy.deepcopy(model)
    opt = FusedLESAM(model.parameters(), **accelerate_recipe.OPTIMIZER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    wrapped = AcceleratedOptimizer(opt, scaler=scaler)
    x, y = next(iter(accelerate_recipe.synthetic_loader()))
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    closure = lambda: scaler.scale(F.cross_entropy(model(x), y)).backward()  # noqa: E731
    with pytest.raises(RuntimeError, match="did not pass itself as grad_scaler="):
        wrapped.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    assert opt._progress.count == 1 and opt.skipped_steps == 0
    assert_trained(model, before)
