"""Models larger than one device: offloaded loading and layer-by-layer calibration passes.

A 7B-70B model does not fit on one GPU (70B in bf16 is 140 GB), but every calibration-based criterion of the
papers only ever needs one decoder layer at a time: Wanda-sp and FLAP (arXiv 2312.11983) read per-feature input
statistics of a layer's projections, and SlimGPT (arXiv 2412.18110) solves each layer's OBS problem on the
layer's inputs, then feeds the layer's outputs to the next one (as SparseGPT/FLAP's ``prepare_calibration_input``
+ per-layer loop). pruneviz does the same:

1. **Load offloaded.** :func:`load_offloaded` loads with accelerate's big-model inference (``device_map``):
   embeddings, final norm and head on the execution device, decoder layers on the execution device while they
   fit (``resident_layers``, or ``device_map="auto"`` with ``max_memory``), the rest in CPU memory or on disk
   (``offload="cpu"|"disk"``). accelerate's hooks copy an offloaded layer's weights to the execution device for
   its forward pass and drop them afterwards.
2. **Capture** the inputs of block 0 for all calibration windows (the "Catcher"): ``[N, T, D]`` activations on
   the execution device, plus every block's other call arguments (mask, rotary embeddings, ALiBi).
3. **Stream.** For block ``i``: run its forward on the captured activations with hooks that accumulate the
   statistics (or Hessians) of its projection inputs, and replace each batch's activations by the block's
   outputs, which are the next block's inputs. Weights are read for scoring inside :func:`materialized`.

Peak device memory is therefore about one decoder layer + the calibration activations ``N·T·D`` (+ the
embedding table), instead of the whole model: for LLaMA-2-70B in bf16 with 128 windows of 2048 tokens,
1.7 GB per layer + 4.3 GB of activations + 1 GB of embeddings. The vocabulary projection, whose logits
``[N, T, V]`` dominate a full forward's activations, is never run. ``bench/layerwise_memory.py`` measures
this on the bundled model.

What works layer by layer: ``magnitude``, ``wanda_sp``, ``flap`` (scores and the bias compensator), ``slimgpt``
(its dense OBS scores and the :func:`~pruneviz.criteria.slimgpt.slimgpt_prune` solver). Criteria that
back-propagate through the whole model (``taylor``) or perturb every weight between full forward passes
(``minillm``), and the depth criteria that compare full-model perplexities, need the model resident and refuse
an offloaded one with a message. Choices: statistics are streamed from the dense model (as FLAP and Wanda-sp do:
every layer sees dense inputs); the activations between layers stay in the model dtype (bf16 on GPU) while the
statistics and Hessians accumulate in fp32.
"""
from __future__ import annotations

import contextlib
import copy
import os
import pathlib
import tempfile
from typing import Iterator

import torch
from torch import nn

from .errors import CriterionError, ModelLoadError

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
    from accelerate.utils import align_module_device

    with contextlib.ExitStack() as stack:
        for m in _hooks(module):
            if getattr(m._hf_hook, "offload", False):
                stack.enter_context(align_module_device(m))
        yield module


def detached_copy(layer: nn.Module, device: torch.device | None = None) -> nn.Module:
    """A plain copy of ``layer`` with real weights and no accelerate hooks (on ``device`` if given).

    The offload stores (``weights_map``) are shared with the original during the copy, never duplicated.
    """
    from accelerate.hooks import remove_hook_from_module

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
    from accelerate.hooks import remove_hook_from_module

    from .arch import adapter_for
    from .surgery import clone_model

    adapter = adapter_for(model)
    copy_ = clone_model(model)  # meta blocks (cheap) + own copies of embeddings and head
    if blocks is None:
        blocks = [detached_copy(layer, torch.device("cpu")) for layer in adapter.layers(model)]
    adapter.set_layers(copy_, nn.ModuleList(blocks))
    remove_hook_from_module(copy_, recurse=True)
    return copy_.to("cpu")


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """Raise a CriterionError if ``model`` is offloaded: ``what`` needs the whole model resident."""
    if is_offloaded(model):
        from .importance import REGISTRY

        ok = ", ".join(sorted(name for name, crit in REGISTRY.items() if crit.layerwise))
        raise CriterionError(
            f"{what} needs the whole model in memory, but this model is offloaded layer by layer. Use a "
            f"layer-wise criterion ({ok}), or load it without offloading on a larger device.")


# ---- loading ------------------------------------------------------------------------------------------------------

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
    import ctypes
    import ctypes.util

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
    from .arch import adapter_for

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


def load_offloaded(source: str = "bundled", device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                   offload: str = "disk", resident_layers: int = 0, device_map: str | dict | None = None,
                   max_memory: dict | None = None, offload_folder: str | os.PathLike | None = None,
                   trust_remote_code: bool = False):
    """Load ``source`` (as :func:`pruneviz.loading.load_model`) with its decoder layers offloaded.

    By default the layers are placed by :func:`offload_device_map` (``offload`` = "disk" or "cpu",
    ``resident_layers`` kept on the execution device); ``device_map="auto"`` with ``max_memory`` (e.g.
    ``{0: "70GiB", "cpu": "200GiB"}``) lets accelerate fill the GPU first instead. Disk offload writes the
    weights once under ``offload_folder`` (a temporary folder by default). Weights are read with safetensors;
    ``trust_remote_code`` stays off unless asked. Returns a :class:`~pruneviz.loading.LoadedModel`.
    """
    import time

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .loading import (BUNDLED_HUB_ID, BUNDLED_NAME, LoadedModel, _check_causal, _check_weights, _ensure_pad_token,
                          _read_config, bundled_folder, is_bundled, pick_device, pick_dtype)

    t0 = time.perf_counter()
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if device_map is None and offload == "cpu" and dev.type == "cpu":
        raise ModelLoadError("offload='cpu' keeps layers in CPU memory for a GPU to fetch; this model would "
                             "compute on the CPU, where that offloads nothing. Use offload='disk' (layers read "
                             "from disk one at a time) or run on a GPU.")
    if is_bundled(source):
        folder, name = bundled_folder(), BUNDLED_NAME
    else:
        folder = _local_folder(str(source))
        _check_causal(_read_config(folder), str(folder))
        _check_weights(folder, allow_pickle=False)
        name = folder.name
    if device_map is None:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        device_map = offload_device_map(skeleton, dev, offload, resident_layers)
        del skeleton
    folder_out = str(offload_folder or tempfile.mkdtemp(prefix="pruneviz-offload-"))
    return_freed_blocks_to_os()
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, max_memory=max_memory, offload_folder=folder_out, dtype=dt,
        trust_remote_code=trust_remote_code, use_safetensors=True)
    model.eval()
    if is_bundled(source):
        model.config._name_or_path = BUNDLED_HUB_ID
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _ensure_pad_token(tokenizer, model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source), name=name, device=dev, dtype=dt,
                       load_seconds=time.perf_counter() - t0, path=pathlib.Path(folder),
                       info={"offload": offload, "offload_folder": folder_out,
                             "device_map": {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}})


def _local_folder(source: str) -> pathlib.Path:
    """``source`` as a local folder: itself, or a Hub id's snapshot (safetensors, configs and tokenizer only),
    from the local cache when offline. Raises ModelLoadError saying what to do."""
    from .loading import _hub_error, _hub_offline, _looks_like_path

    folder = pathlib.Path(source).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_path(source) or not source:
        raise ModelLoadError(f"offloaded loading needs a local model folder with safetensors weights; {source!r} "
                             f"is not one (check the path, or use 'bundled')")
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        return pathlib.Path(snapshot_download(source, local_files_only=offline, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # noqa: BLE001 - any Hub/offline failure becomes one message
        raise _hub_error(source, exc, offline, False) from exc


# ---- the layer stream ---------------------------------------------------------------------------------------------

def capture_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8):
    """Block-0 inputs of all calibration windows ``tokens`` ([N, T]) and every block's call arguments, taken
    directly on ``model`` (its temporary hook is removed again): a :class:`~pruneviz.criteria.slimgpt.LayerStream`.

    For an offloaded model no clone is made (cloning would copy accelerate's offload stores).
    """
    from .arch import adapter_for
    from .criteria.slimgpt import LayerStream, _catch, _mixed_layer_types, _split_hidden, capture_stream

    if not is_offloaded(model):
        return capture_stream(model, tokens, batch_size)
    if _mixed_layer_types(model):
        raise CriterionError("layer-wise passes over an offloaded model need every block to take the same mask; "
                             "this model mixes layer types (sliding-window and full attention)")
    layers = adapter_for(model).layers(model)
    with torch.no_grad():
        split = [_split_hidden(c) for c in _catch(model, layers[0], tokens, batch_size)]
    stream = LayerStream([s[0] for s in split], [[s[1] for s in split]], split[0][2])
    stream.calls = stream.calls * len(layers)
    return stream


def layerwise_stats(model: nn.Module, calib, span=None, sites=None, batch_size: int = 8):
    """The statistics of :func:`pruneviz.criteria.stats.collect_stats`, computed one block at a time.

    Same numbers as the full forward pass (same dense inputs, same fp32 accumulation) up to floating-point
    summation order; peak memory is one block plus the calibration activations.
    """
    from .arch import adapter_for
    from .criteria.stats import SITES, Span, StatsCollector
    from .importance import Calibration

    span = span or Span(None)
    layers = adapter_for(model).layers(model)
    tokens = calib.tokens if isinstance(calib, Calibration) else calib
    with torch.inference_mode():
        stream = capture_inputs(model, tokens, batch_size)
        # every block's hooks are in place, but a block's only fire while it streams
        with StatsCollector(model, sites or SITES) as collector:
            for i, layer in enumerate(layers):
                for b in range(len(stream.hidden)):
                    stream.hidden[b] = stream.call(layer, i, b)  # the next block's inputs, in place
                span.step((i + 1) / len(layers), f"calibration statistics: block {i + 1}/{len(layers)}")
    return collector.result()
