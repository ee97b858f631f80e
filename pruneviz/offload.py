"""Offloaded models: what lives off the execution device behind accelerate hooks, and how to read or copy it.

The bottom layer of everything that touches an offloaded model (``pruneviz.loading.load_offloaded`` makes one):
where a model computes (:func:`execution_device`, the one device function of the package), reading offloaded
weights (:func:`materialized`), plain copies (:func:`clone_model`, :func:`detached_copy`, :func:`resident_copy`),
and the ``device_map`` that keeps embeddings and head on the device and the decoder blocks off it.

Why offloading works for pruning: every calibration-based criterion of the papers only ever needs one decoder
layer at a time (Wanda-sp and FLAP, arXiv 2312.11983, read per-feature input statistics of a layer; SlimGPT,
arXiv 2412.18110, solves each layer's OBS problem on that layer's inputs). The layer stream that feeds them is
:mod:`pruneviz.criteria.capture`; layer-by-layer statistics are in :mod:`pruneviz.criteria.stats`.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
from typing import Iterator

import torch
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import align_module_device
from torch import nn

from .arch import adapter_for
from .errors import ModelLoadError

OFFLOAD = ("cpu", "disk")


# ---- what is offloaded --------------------------------------------------------------------------------------------

def _hooks(module: nn.Module):
    return [m for m in module.modules() if getattr(m, "_hf_hook", None) is not None]


def is_offloaded(model: nn.Module) -> bool:
    """True when some of ``model``'s weights live off the execution device behind accelerate hooks."""
    return any(getattr(m._hf_hook, "offload", False) for m in _hooks(model))


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: accelerate's execution device if dispatched, else its first real parameter's."""
    for m in _hooks(model):
        dev = getattr(m._hf_hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def materialized(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every offloaded weight of ``module`` is a real tensor on the execution device.

    A no-op for ordinary modules. Use it to *read* weights; a forward pass inside the block would offload them
    again when it returns (accelerate's post-forward hook), so run forwards outside it.
    """
    with contextlib.ExitStack() as stack:
        for m in _hooks(module):
            if getattr(m._hf_hook, "offload", False):
                stack.enter_context(align_module_device(m))
        yield module


def clone_model(model: nn.Module, share_weights: bool = False, own_parameters: bool = False) -> nn.Module:
    """A structural copy of ``model``. With ``share_weights`` the parameters and buffers are the same tensors.

    With ``own_parameters`` (and ``share_weights``) every plain ``nn.Parameter`` of the copy is a new Parameter
    over the *same storage* (no memory), so its ``requires_grad`` flag and ``.grad`` belong to the copy: what
    gradient passes need to run at the same time as others on one shared base model. Modules, hooks and
    replaced forwards of a copy are always its own, which is how every hook-based pass stays per call.
    accelerate's offload stores (of an offloaded model) are shared, never copied.
    """
    memo = {}
    if share_weights:
        memo = {id(t): t for t in model.buffers()}
        for p in model.parameters():
            alias = own_parameters and type(p) is nn.Parameter and p.device.type != "meta"
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad) if alias else p
    for m in model.modules():
        store = getattr(getattr(m, "_hf_hook", None), "weights_map", None)
        if store is not None:
            memo[id(store)] = store
    return copy.deepcopy(model, memo)


def detached_copy(layer: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A plain copy of ``layer`` with real weights and no accelerate hooks (on ``device`` if given).

    The offload stores (``weights_map``) are shared with the original during the copy, never duplicated.
    """
    hooks = [m._hf_hook for m in _hooks(layer)]
    memo = {id(h.weights_map): h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None}
    memo.update({id(h): h for h in hooks})
    with materialized(layer):
        new = copy.deepcopy(layer, memo)
    remove_hook_from_module(new, recurse=True)
    return new.to(device) if device is not None else new


def resident_copy(model: nn.Module, blocks: list[nn.Module] | None = None) -> nn.Module:
    """A plain CPU copy of an offloaded ``model``: every block materialised (one at a time), no hooks.

    What surgery works on when the base is offloaded: the pruned model is built in CPU memory (the dense copy
    must fit there once; pruning then shrinks it), ready to evaluate or export. ``model`` is not changed.
    ``blocks`` (plain modules, e.g. SlimGPT's compensated ones) replace the model's own blocks in the copy.
    """
    adapter = adapter_for(model)
    copy_ = clone_model(model)  # meta blocks (cheap) + own copies of embeddings and head
    if blocks is None:
        blocks = [detached_copy(layer, torch.device("cpu")) for layer in adapter.layers(model)]
    adapter.set_layers(copy_, nn.ModuleList(blocks))
    remove_hook_from_module(copy_, recurse=True)
    return copy_.to("cpu")


# ---- placing and freeing blocks ------------------------------------------------------------------------------------

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def return_freed_blocks_to_os() -> bool:
    """Fix glibc's mmap threshold at 128 KiB so that freed weight buffers go back to the OS (Linux/glibc only).

    By default glibc raises the threshold after the first large buffer is freed (up to 32 MiB), after which
    buffers of a block's size come from the heap and stay in the process when freed: streaming 30 blocks then
    keeps growing the resident memory by hundreds of MiB although only one block is alive (measured on the
    bundled model). Setting ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment does the same. Returns True
    if the setting was applied.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def offload_device_map(model: nn.Module, execution: str | torch.device = "cpu", offload: str = "disk",
                       resident_layers: int = 0) -> dict[str, str]:
    """A ``device_map`` keeping everything but the decoder layers on ``execution``, the first ``resident_layers``
    layers there too, and the others on ``offload`` ("cpu" memory or "disk")."""
    if offload not in OFFLOAD:
        raise ModelLoadError(f"offload must be one of {OFFLOAD}, not {offload!r}")
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    exec_name = str(torch.device(execution))
    path = prefix.split(".")  # e.g. ["model", "layers"], ["model", "decoder", "layers"], ["transformer", "h"]
    dm = {}
    for depth, step in enumerate(path):  # everything beside the path down to the blocks stays on the device
        parent = model.get_submodule(".".join(path[:depth]))
        dm.update({".".join(path[:depth] + [name]): exec_name for name, _ in parent.named_children() if name != step})
    for i in range(len(layers)):
        dm[f"{prefix}.{i}"] = exec_name if i < resident_layers else offload
    return dm
