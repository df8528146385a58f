"""ModuleAttribution: which module of the model is running now, in forward and in backward.

Forward is seen by module hooks (a stack of running modules). Backward has no
module hooks that fire around the module's own ops, so a module's backward is
taken to start when the first gradient of its outputs exists and to end when
the gradients of its inputs do, both seen by ``register_multi_grad_hook``
(``mode="any"``). Allocations are attributed to the innermost module running.

Modules are numbered in ``model.named_modules()`` order; :attr:`paths` holds
their dotted paths (the root model is ``""``), and -1 means outside the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook

from memfit import _torch_private
from memfit._tree import tensors

__all__ = ["ModuleAttribution"]


class ModuleAttribution:
    """The innermost module running, for a model's forward and backward.

    Args:
        model: the model whose submodules are attributed (None: nothing is).
        on_root_forward: called with the root's ``(args, kwargs)`` when the
            model's outermost forward starts (the tracker marks the batch there).
        active: whether the hooks should act now (the tracker is entered).
    """

    def __init__(self, model: nn.Module | None, on_root_forward: Callable[[tuple, dict], None],
                 active: Callable[[], bool]) -> None:
        self.model = model
        self.on_root_forward = on_root_forward
        self.active = active
        self.paths: list[str] = []
        self.ids: dict[int, int] = {}
        if model is not None:
            for path, module in model.named_modules():
                self.ids[id(module)] = len(self.paths)
                self.paths.append(path)
        self.root = 0 if model is not None else -1
        self.forward_stack: list[int] = []
        self.backward_stack: list[int] = []

    def current(self) -> int:
        """The innermost module running (forward first), or -1."""
        if self.forward_stack:
            return self.forward_stack[-1]
        if self.backward_stack:
            return self.backward_stack[-1]
        return -1

    def install(self) -> list[Any]:
        """Register the forward hooks on every module; returns their handles."""
        handles = []
        if self.model is not None:
            for module in self.model.modules():
                mid = self.ids.get(id(module))
                if mid is None:  # a submodule added after the tracker was made
                    continue
                handles.append(module.register_forward_pre_hook(self._pre_forward_hook(mid), with_kwargs=True, prepend=True))
                handles.append(
                    module.register_forward_hook(self._post_forward_hook(mid), with_kwargs=True, always_call=True)
                )
        return handles

    def clear(self) -> None:
        self.forward_stack.clear()
        self.backward_stack.clear()

    def _pre_forward_hook(self, mid: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not self.active():
                return
            if mid == self.root and not self.forward_stack:
                self.on_root_forward(args, kwargs)
            self.forward_stack.append(mid)
            if torch.is_grad_enabled() and not _torch_private.in_backward():
                inputs = [t for t in tensors((args, kwargs)) if t.requires_grad]
                if inputs:
                    # The module's backward ends when the grads of its inputs exist.
                    register_multi_grad_hook(inputs, self._backward_exit(mid), mode="any")

        return hook

    def _post_forward_hook(self, mid: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.active():
                return
            stack = self.forward_stack
            if mid in stack:
                del stack[len(stack) - 1 - stack[::-1].index(mid) :]
            if torch.is_grad_enabled() and not _torch_private.in_backward():
                outputs = [t for t in tensors(output) if t.requires_grad]
                if outputs:
                    # The module's backward starts when the first grad of its outputs exists.
                    register_multi_grad_hook(outputs, self._backward_enter(mid), mode="any")

        return hook

    def _backward_enter(self, mid: int):
        def hook(grad: Any) -> None:
            if not self.active():
                return
            paths = self.paths
            path = paths[mid]
            # Backward of siblings does not interleave: entries that are neither
            # ancestors nor descendants of this module have finished (a module
            # whose inputs need no grad never reports its end).
            stack = [m for m in self.backward_stack if _is_ancestor(paths[m], path) or _is_ancestor(path, paths[m])]
            # A parent and its last child share an output, so their hooks fire
            # together (child first): keep the innermost module on top.
            position = len(stack)
            while position > 0 and _is_ancestor(path, paths[stack[position - 1]]):
                position -= 1
            stack.insert(position, mid)
            self.backward_stack = stack

        return hook

    def _backward_exit(self, mid: int):
        def hook(grad: Any) -> None:
            if not self.active():
                return
            stack = self.backward_stack
            if mid in stack:
                del stack[stack.index(mid) :]

        return hook


def _is_ancestor(parent: str, child: str) -> bool:
    return parent == "" or child == parent or child.startswith(parent + ".")
