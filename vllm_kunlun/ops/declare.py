"""Declaring an op of the kernel seam, once: `@kernel_op(...)` on a typed, body-less function.

The decorated function's signature is the op's contract. The decorator registers it as the torch
custom op `torch.ops.kunlun.<name>` (schema from the type hints, the given fake implementation
for tracing) and returns the function layers call: it counts the call (op accounting) and runs
the chosen provider's kernel for the op (vllm_kunlun.ops.provider). While torch.compile traces,
the call is emitted as `torch.ops.kunlun.<name>`; in eager mode the kernel runs directly,
skipping the dispatcher's per-call cost.

Every declared op is recorded in `DECLARED` with its family (the package it is declared in), so
the provider, `check-kernels` and the tests find new ops and families without a list to edit.
This module imports torch only: the kernel layer must work without vLLM.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_kunlun.ops import stats


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str
    signature: inspect.Signature
    mutates_args: tuple[str, ...]
    call: Callable
    custom_op: object


#: Every declared op, by name, in declaration order.
DECLARED: dict[str, OpSpec] = {}


def writes_in_place_only(*args, **kwargs) -> None:
    """Fake implementation of the ops that only mutate their arguments: no new tensors."""
    return None


def same_as_first_input(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(x)


def half_of_last_dim(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def kernel_op(
    mutates_args: tuple[str, ...] = (), fake: Callable = writes_in_place_only
) -> Callable[[Callable], Callable]:
    """Declare the decorated function (its signature and docstring; the body is not run)."""

    def declare(contract: Callable) -> Callable:
        from vllm_kunlun.ops.provider import current_provider

        name = contract.__name__
        family = contract.__module__.rsplit(".", 1)[-1]

        def counted(*args, **kwargs):
            stats.record(name)
            return current_provider().kernel(name)(*args, **kwargs)

        counted.__signature__ = inspect.signature(contract)
        counted.__annotations__ = contract.__annotations__
        custom = torch.library.custom_op(f"kunlun::{name}", counted, mutates_args=mutates_args)
        custom.register_fake(fake)

        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return custom(*args, **kwargs)
            return counted(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = contract.__doc__
        call.__signature__ = inspect.signature(contract)
        call.__module__ = contract.__module__
        DECLARED[name] = OpSpec(name, family, inspect.signature(contract), mutates_args,
                                call, custom)  # fmt: skip
        return call

    return declare
