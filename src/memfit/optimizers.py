"""How the optimizer runs: its implementation (per-tensor loop, foreach, fused), and the step in backward.

Both change the peak without changing the math:

* torch.optim's implementations keep different temporaries. AdamW's per-tensor
  loop (``_single_tensor_adamw``) makes ``exp_avg_sq.sqrt() / bias_correction2_sqrt``,
  two temporaries the size of one parameter at a time. The foreach version
  (``_multi_tensor_adamw``) runs ``_foreach_sqrt`` over every ``exp_avg_sq`` at
  once, a copy of all of them. The fused kernel (``_fused_adamw_``) makes none.
  PyTorch defaults to foreach on CUDA and to the loop on CPU
  (torch/optim/optimizer.py, ``_default_to_fused_or_foreach``).
* The optimizer step in backward: one optimizer per parameter, stepped in the
  parameter's post-accumulate-grad hook, which then frees the gradient. The
  gradients of a few parameters are alive at a time instead of all of them
  (PyTorch's tutorial "How to save memory by fusing the optimizer step into the
  backward pass").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from memfit.errors import UsageError

__all__ = ["OptimizerInBackward", "set_implementation"]


def set_implementation(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Make ``optimizer`` run as ``impl`` (``"for-loop"``, ``"foreach"``, ``"fused"``; ``"default"`` leaves it)."""
    if isinstance(optimizer, OptimizerInBackward):
        for inner in optimizer.optimizers.values():
            set_implementation(inner, impl)
        return
    if impl == "default":
        return
    flag = {"for-loop": "foreach", "foreach": "foreach", "fused": "fused"}[impl]
    if flag not in optimizer.defaults:
        raise UsageError(f"optimizer_impl={impl!r} needs an optimizer with a {flag} implementation "
                         f"(torch.optim's Adam, AdamW, SGD, Adagrad have both); {type(optimizer).__name__} has none: "
                         "use optimizer_impl='default'")
    for group in optimizer.param_groups:
        group["foreach"] = impl == "foreach"
        if "fused" in group:
            group["fused"] = impl == "fused" or None


class OptimizerInBackward(torch.optim.Optimizer):
    """One optimizer per parameter (``factory([p])``), each stepped in its parameter's post-accumulate-grad hook.

    Every update happens during backward. :meth:`step` only marks the end of a step
    (step hooks see one step per backward). :attr:`state` holds the per-parameter
    optimizers' state as one optimizer's would (the step hooks read it there).
    ``before_step(p)``, when set, runs before each parameter's update (memfit's
    tracker marks the gradient, which the update frees before its own hook sees it).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = OptimizerInBackward(model.parameters(), lambda ps: torch.optim.AdamW(ps))
        >>> model(torch.ones(3, 4)).sum().backward()  # updated, gradients already freed
        >>> model.weight.grad is None
        True
    """

    def __init__(self, params: Iterable[torch.Tensor],
                 factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise UsageError("optimizer_in_backward: the model has no parameter that requires grad")
        self.optimizers = {p: factory([p]) for p in params}
        super().__init__(params, {})
        self.before_step: Callable[[torch.Tensor], None] | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one) for p in params]

    def _step_one(self, p: torch.Tensor) -> None:
        if self.before_step is not None:
            self.before_step(p)
        optimizer = self.optimizers[p]
        optimizer.step()
        self.state[p] = optimizer.state[p]
        optimizer.zero_grad(set_to_none=True)  # this gradient's memory is released now, not at the step's end

    def step(self, closure: Any = None) -> None:
        """Nothing left to do: every parameter was stepped in backward."""
        return None

    def remove(self) -> None:
        """Unhook from the parameters (the model trains without stepping in backward again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
