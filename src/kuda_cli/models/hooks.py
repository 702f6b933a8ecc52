"""One hook utility for reading and editing module activations during a forward pass.

    with trace(model, ["model.layers.3.mlp"], inputs=True) as rec:
        model(**batch)
    rec["model.layers.3.mlp"].output   # the module's output tensor
    rec["model.layers.3.mlp"].input    # its first input (for down_proj: the MLP keys)

`edit={name: fn}` replaces a module's output by `fn(output)`; `stop_after=name` ends the forward
pass right after that module (the rest of the network is not computed). Modules that return
tuples (decoder blocks in older transformers) are handled: records hold, and edits receive, the
first element, the hidden states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; swallowed by `trace`."""


@dataclass
class Record:
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def main_tensor(value: Any) -> torch.Tensor:
    """The hidden-states tensor of a module output or input (first element of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a tensor in a module value of type {type(value).__name__}")


def with_main_tensor(value: Any, new: torch.Tensor) -> Any:
    """`value` with its hidden-states tensor replaced by `new` (keeps tuple structure)."""
    if isinstance(value, torch.Tensor):
        return new
    return type(value)([new, *value[1:]])


@contextmanager
def trace(
    model: nn.Module,
    names: Iterable[str],
    *,
    outputs: bool = True,
    inputs: bool = False,
    edit: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stop_after: str | None = None,
    detach: bool = False,
) -> Iterator[dict[str, Record]]:
    """Record inputs/outputs of the named modules, optionally editing outputs or stopping early."""
    edit = dict(edit or {})
    wanted = list(dict.fromkeys([*names, *edit, *([stop_after] if stop_after else [])]))
    records = {name: Record() for name in wanted}
    handles = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        return t.detach() if detach else t

    def make_pre_hook(name: str):
        def pre_hook(module, args, kwargs):
            first = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            records[name].input = keep(main_tensor(first))

        return pre_hook

    def make_hook(name: str):
        def hook(module, args, output):
            if name in edit:
                output = with_main_tensor(output, edit[name](main_tensor(output)))
            if outputs:
                records[name].output = keep(main_tensor(output))
            if name == stop_after:
                raise StopForward(name)
            return output

        return hook

    try:
        for name in wanted:
            module = model.get_submodule(name)
            if inputs:
                handles.append(
                    module.register_forward_pre_hook(make_pre_hook(name), with_kwargs=True)
                )
            handles.append(module.register_forward_hook(make_hook(name)))
        yield records
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
