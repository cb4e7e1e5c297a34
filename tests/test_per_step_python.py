"""The Python work of a step does not grow with the number of tensors (only with buckets and groups).

Counted with the interpreter's trace hook: every Python function call and every line executed is
an event. A step over 200 parameters must make exactly as many as a step over 8 in the same layout
of buckets: a loop over the parameters anywhere in the step, even one of attribute reads only,
would add events per parameter.
"""

from __future__ import annotations

import sys

import pytest
import torch

from fused_lesam import FusedLESAM, available_backends

BACKENDS = [b for b in ("torch", "cpp") if not available_backends()[b]]


def events_per_step(n_tensors, base, backend, **kwargs):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, generator=gen)) for _ in range(n_tensors)]
    opt = FusedLESAM(params, base=base, backend=backend, **kwargs)

    def step():
        for p in params:  # the backward's work, outside the counted region
            p.grad.copy_(torch.randn(7, generator=gen)) if p.grad is not None else setattr(p, "grad", torch.randn(7))
        counted = [0]

        def count(frame, event, arg):
            counted[0] += 1
            return count  # trace the lines of every frame too

        sys.settrace(count)
        try:
            opt.first_step()
            opt.second_step()
        finally:
            sys.settrace(None)
        return counted[0]

    for _ in range(3):  # first steps set up state and bind gradients
        step()
    return step(), opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "base, kwargs",
    [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-4)), (torch.optim.AdamW, dict(lr=1e-3))],
    ids=["sgd", "adamw"],
)
def test_python_events_of_a_step_do_not_grow_with_the_tensors(base, kwargs, backend):
    few, opt = events_per_step(8, base, backend, **kwargs)
    many, _ = events_per_step(200, base, backend, **kwargs)
    assert opt.base_update == "fused"
    assert many == few, f"a step makes {few} Python events with 8 tensors and {many} with 200"
