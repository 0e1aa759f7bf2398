"""Record the gradients the train stage's optimizer steps apply, without changing the stage.

Usage (in a test, or in a trainer subprocess before it calls ``run``)::

    gradients, spy = gradient_spy()
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", spy)  # a subprocess: plain assignment
    run(ctx)
    gradients[0]   # step 1: one tensor per trainable parameter, in model.parameters() order

The loop calls ``accelerator.clip_grad_norm_`` once per optimizer step, after the
last micro-batch's backward (so after DDP's all-reduce) and before clipping: the
gradient copied there is the whole step's, as every process sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def gradient_spy() -> tuple[list[list[torch.Tensor]], Callable[..., Any]]:
    """(the record, a ``clip_grad_norm_`` replacement that copies the gradients, then clips)."""
    from accelerate import Accelerator

    recorded: list[list[torch.Tensor]] = []
    clip = Accelerator.clip_grad_norm_

    def copy_then_clip(
        self: Accelerator, parameters: Iterable[torch.nn.Parameter], *args: Any, **kwargs: Any
    ) -> Any:
        parameters = list(parameters)
        recorded.append([p.grad.detach().clone() for p in parameters if p.grad is not None])
        return clip(self, parameters, *args, **kwargs)

    return recorded, copy_then_clip
