"""Block inputs, captured once and streamed block by block: the "Catcher" every layer-wise method needs.

Wanda, SparseGPT, FLAP and SlimGPT (arXiv 2412.18110, Sec. 3) all calibrate one decoder block at a time on the
activations that enter it: capture block 0's inputs for every calibration window (stopping each forward there),
then for block ``i`` run it on those activations, record what the method needs (statistics, Hessians) and
replace the activations by the block's outputs, which are block ``i+1``'s inputs. This module holds that
engine once: :class:`LayerStream`, :func:`capture_stream` (on a tensor-sharing clone of a resident model) and
:func:`capture_inputs` (also on an offloaded model, where no clone is made).

Blocks of models that mix layer types (sliding-window and full attention) get different masks; the stream then
records every block's own call arguments (:func:`calls_per_layer`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..arch import Adapter, adapter_for
from ..errors import CriterionError
from ..offload import clone_model, execution_device, is_offloaded


class Stop(Exception):
    """Stops a forward pass from inside a hook (carries the hooked call's arguments)."""

    def __init__(self, args: tuple = (), kwargs: dict | None = None):
        super().__init__("stop")
        self.call = (args, kwargs or {})


@dataclass
class LayerStream:
    """Calibration activations entering the layer being processed, and every layer's other call arguments.

    ``hidden[b]`` is batch ``b``'s hidden state ([b, T, D], model dtype). ``calls[i][b]`` holds layer ``i``'s
    remaining positional arguments and keyword arguments for batch ``b`` (mask, rotary embeddings, ALiBi, ...).
    """

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]
    by_keyword: bool = False

    def raw_call(self, layer: nn.Module, i: int, b: int):
        """``layer`` (playing layer ``i``) called on batch ``b``; its output as the block returns it."""
        args, kwargs = self.calls[i][b]
        x = self.hidden[b]
        return layer(*args, hidden_states=x, **kwargs) if self.by_keyword else layer(x, *args, **kwargs)

    def call(self, layer: nn.Module, i: int, b: int) -> torch.Tensor:
        """The hidden-state output [b, T, D] of ``layer`` (playing layer ``i``) on batch ``b``."""
        out = self.raw_call(layer, i, b)
        return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def pre_hook(module: nn.Module, fn: Callable, **kw) -> Iterator[None]:
    handle = module.register_forward_pre_hook(fn, **kw)
    try:
        yield
    finally:
        handle.remove()


def catch_calls(view: nn.Module, layer: nn.Module, tokens: torch.Tensor, batch_size: int) -> list[tuple[tuple, dict]]:
    """Arguments of ``layer``'s call for each batch, stopping each forward there (the Catcher)."""
    def grab(module, args, kwargs):
        raise Stop(args, kwargs)

    device, calls = execution_device(view), []
    with pre_hook(layer, grab, with_kwargs=True):
        for batch in tokens.split(batch_size):
            try:
                view(input_ids=batch.to(device), use_cache=False)
            except Stop as stop:
                calls.append(stop.call)
            else:
                raise CriterionError("could not capture a block's inputs: the forward pass never reached it")
    return calls


def split_hidden(call: tuple[tuple, dict]) -> tuple[torch.Tensor, tuple[tuple, dict], bool]:
    args, kwargs = call
    if args:
        return args[0], (tuple(args[1:]), dict(kwargs)), False
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), ((), kwargs), True


def mixed_layer_types(model: nn.Module) -> bool:
    types = getattr(model.config, "layer_types", None)
    return isinstance(types, (list, tuple)) and len(set(types)) > 1


def passthrough(as_tuple: bool) -> Callable:
    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if as_tuple else hidden
    return forward


def calls_per_layer(view: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int,
                     stream: LayerStream) -> list[list[tuple[tuple, dict]]]:
    """Each layer's own call arguments (models whose layers get different masks, e.g. sliding windows).

    Every block of ``view`` (a tensor-sharing clone) is replaced by a pass-through that keeps the block's output
    format, so one forward per batch records all layers' arguments without computing any block.
    """
    layers = adapter.layers(view)
    as_tuple = isinstance(stream.raw_call(layers[0], 0, 0), (tuple, list))
    for layer in layers:
        layer.forward = passthrough(as_tuple)  # instance attribute of the clone only
    return record_all(view, layers, tokens, batch_size)


def record_all(view: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor,
                batch_size: int) -> list[list[tuple[tuple, dict]]]:
    """Per layer, per batch: the call arguments (hidden state dropped) seen by each block of ``view``."""
    records: list[list] = [[] for _ in layers]

    def recorder(j):
        return lambda module, args, kwargs: records[j].append((args, kwargs))

    handles = [layer.register_forward_pre_hook(recorder(j), with_kwargs=True) for j, layer in enumerate(layers)]
    try:
        catch_calls(view, layers[-1], tokens, batch_size)
    finally:
        for h in handles:
            h.remove()
    return [[split_hidden(c)[1] for c in rec] for rec in records]


def capture_stream(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> LayerStream:
    """Inputs of the first block for all calibration windows ``tokens`` ([N, T]) and every block's call arguments.

    Runs on a tensor-sharing clone, so ``model`` itself never carries a hook.
    """
    adapter = adapter_for(model)
    view = clone_model(model, share_weights=True)
    with torch.no_grad():
        calls = catch_calls(view, adapter.layers(view)[0], tokens, batch_size)
        split = [split_hidden(c) for c in calls]
        stream = LayerStream([s[0] for s in split], [[s[1] for s in split]], split[0][2])
        n = len(adapter.layers(view))
        stream.calls = stream.calls * n
        if mixed_layer_types(model):
            stream.calls = calls_per_layer(view, adapter, tokens, batch_size, stream)
    return stream


def advance(layer: nn.Module, i: int, stream: LayerStream) -> None:
    """Replace the stream's hidden states by ``layer``'s outputs (the next layer's inputs)."""
    stream.hidden = [stream.call(layer, i, b) for b in range(len(stream.hidden))]


def capture_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> LayerStream:
    """Block-0 inputs of all calibration windows ``tokens`` ([N, T]) and every block's call arguments: a
    :class:`LayerStream`. The catching hook sits on a tensor-sharing clone, never on ``model`` (another thread's
    forward through ``model`` would hit it); an offloaded model's clone shares its offload stores.
    """
    if not is_offloaded(model):
        return capture_stream(model, tokens, batch_size)
    view = clone_model(model, share_weights=True)
    adapter = adapter_for(view)
    layers = adapter.layers(view)
    with torch.no_grad():
        split = [split_hidden(c) for c in catch_calls(view, layers[0], tokens, batch_size)]
        stream = LayerStream([s[0] for s in split], [[s[1] for s in split]], split[0][2])
        stream.calls = stream.calls * len(layers)
        if mixed_layer_types(model):  # sliding and full layers: per-layer masks, recorded without running blocks
            stream.calls = calls_per_layer(view, adapter, tokens, batch_size, stream)
    return stream
