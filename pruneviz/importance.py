"""Importance maps and the criterion registry.

Every criterion returns the same :class:`ImportanceMap`: scores per layer for query heads ``[L, H]``, KV groups
``[L, G]``, MLP channels ``[L, C]`` and whole blocks ``[L]`` (any of them may be absent), **higher = more
important**, plus a record of what was used (calibration text hash, samples, seed, time, peak memory).

A criterion is a small class with a name, the maps it produces, an options dataclass (documented defaults) and
one method ``score(model, calib, options, ctx) -> ImportanceMap``. Register it with ``@register``; look it up
with :func:`get` (a helpful error lists the names); run it with :func:`compute`, which adds timing, peak memory,
out-of-memory advice, progress and cancellation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .arch import MAP_NAMES, UNITS, Geometry, unit_kind
from .errors import CriterionError, is_oom, oom_advice
from .fsio import strict_json
from .limits import check_context
from .offload import clone_model, execution_device, is_offloaded
from .plan import geometry_from_dict, weight_probe
from .progress import Cancel, Cancelled, Context, Progress

MAPS = MAP_NAMES  # ("heads", "kv", "channels", "blocks")


# ---- the result ---------------------------------------------------------------------------------------------------

@dataclass
class ImportanceMap:
    """Scores of one criterion on one model. Higher means more important (keep it)."""

    criterion: str
    geometry: Geometry
    heads: torch.Tensor | None = None  # [L, H]
    kv: torch.Tensor | None = None  # [L, G]
    channels: torch.Tensor | None = None  # [L, C]
    blocks: torch.Tensor | None = None  # [L]
    meta: dict = field(default_factory=dict)  # calibration, options, seconds, peak memory, device, versions
    extras: dict = field(default_factory=dict)  # criterion-specific diagnostics (JSON-able)

    def __post_init__(self):
        g = self.geometry
        want = {u.map: ((g.n_layers, u.count(g)) if u.width else (g.n_layers,)) for u in UNITS.values()}
        for name, shape in want.items():
            t = getattr(self, name)
            if t is None:
                continue
            t = torch.as_tensor(t).detach().float().cpu()
            if tuple(t.shape) != shape:
                raise CriterionError(f"{self.criterion}: {name} map has shape {tuple(t.shape)}, expected {shape}")
            setattr(self, name, t)

    def get(self, kind: str) -> torch.Tensor | None:
        """Map for a unit kind: head/kv/channel/block (or the map names)."""
        return getattr(self, unit_kind(kind).map)

    def available(self) -> list[str]:
        return [m for m in MAPS if getattr(self, m) is not None]

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "geometry": self.geometry.to_dict(), "meta": self.meta,
                "extras": self.extras,
                **{m: getattr(self, m).tolist() for m in self.available()}}

    @classmethod
    def from_dict(cls, d: dict) -> "ImportanceMap":
        """Strictly: the fields :meth:`to_dict` writes, a geometry of whole numbers, maps of numbers (not booleans
        or strings) of the geometry's shapes. CriterionError names the field; a plan file is recognised as one."""
        if not isinstance(d, dict):
            raise CriterionError(f"the scores file holds a JSON {type(d).__name__}, not importance scores; pass a "
                                 f"file written by 'python -m pruneviz score --out'")
        if str(d.get("schema", "")).startswith("pruneviz.plan"):
            raise CriterionError("this is a pruning plan, not importance scores; pass it as --plan (or give scores "
                                 "written by 'python -m pruneviz score --out')")
        extra = sorted(set(d) - {"criterion", "geometry", "meta", "extras", *MAPS})
        if extra:
            raise CriterionError(f"the scores file has unknown fields {extra}; pass a file written by "
                                 f"'python -m pruneviz score --out'")
        if not isinstance(d.get("criterion"), str):
            raise CriterionError("the scores field 'criterion' is missing or not a string; pass a file written by "
                                 "'python -m pruneviz score --out'")
        for key in ("meta", "extras"):
            if not isinstance(d.get(key, {}), dict):
                raise CriterionError(f"the scores field '{key}' must be an object")
        geometry = geometry_from_dict(d.get("geometry"), "the scores field 'geometry'", CriterionError)
        maps = {m: _score_tensor(d[m], m) for m in MAPS if d.get(m) is not None}
        if not maps:
            raise CriterionError("the scores file holds no map (heads, kv, channels or blocks); score again")
        return cls(d["criterion"], geometry, meta=d.get("meta", {}), extras=d.get("extras", {}), **maps)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ImportanceMap":
        """:meth:`from_dict` of strictly parsed JSON (duplicate keys, deep nesting and huge numbers refused)."""
        return cls.from_dict(strict_json(text, CriterionError, "the scores file"))

    def check_weights(self, model: nn.Module) -> None:
        """Raise CriterionError if these scores record a weight probe (:func:`pruneviz.plan.weight_probe`) that
        ``model`` does not match: scores of another checkpoint with the same shapes would rank the wrong units."""
        probe = self.meta.get("probe") if isinstance(self.meta, dict) else None
        if not probe:
            return
        mine = weight_probe(model, len(probe))
        if not torch.allclose(torch.tensor(mine), torch.tensor([float(x) for x in probe]), rtol=2e-2, atol=1e-3):
            raise CriterionError(f"these {self.criterion} scores were computed on {self.meta.get('model', 'a model')!r}"
                                 f", which has the same shapes as the loaded model but different weights; score "
                                 f"this model instead")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def _score_tensor(value, name: str) -> torch.Tensor:
    """A map from JSON: nested lists of numbers (NaN allowed for unscored units), nothing else."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise CriterionError(f"the scores field '{name}' holds {str(item)[:40]!r}; scores must be numbers")
    if not isinstance(value, list):
        raise CriterionError(f"the scores field '{name}' must be a list of numbers per layer")
    try:
        return torch.tensor(value, dtype=torch.float64)
    except (ValueError, TypeError, OverflowError, RuntimeError) as e:
        raise CriterionError(f"the scores field '{name}' is not a rectangular table of numbers ({str(e)[:80]}); "
                             f"score again") from e


# ---- calibration record ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Token windows a criterion learns from, with what is needed to reproduce them."""

    tokens: torch.Tensor  # [N, T] int64
    text_name: str = "custom"
    text_sha256: str = ""
    seed: int = 0

    def describe(self) -> dict:
        n, t = self.tokens.shape
        return {"text": self.text_name, "text_sha256": self.text_sha256, "samples": n, "seq_len": t,
                "seed": self.seed}

    def batches(self, batch_size: int, device) -> Iterator[torch.Tensor]:
        for i in range(0, self.tokens.shape[0], batch_size):
            yield self.tokens[i:i + batch_size].to(device)  # [b, T]


# ---- the interface and registry -------------------------------------------------------------------------------------

@dataclass
class NoOptions:
    """This criterion has no options."""


class Criterion:
    """One importance criterion. Subclasses set the class attributes and implement :meth:`score`."""

    name: ClassVar[str]
    title: ClassVar[str]  # short human name for the UI
    paper: ClassVar[str] = ""  # reference (arXiv id / URL)
    produces: ClassVar[tuple[str, ...]]  # subset of MAPS
    needs_calibration: ClassVar[bool] = True
    uses_gradients: ClassVar[bool] = False  # backprop (memory of training)
    layerwise: ClassVar[bool] = False  # runs on an offloaded model one block at a time (pruneviz.offload)
    is_solver: ClassVar[bool] = False  # a solver (plans + compensated weights); its map is a dense-model by-product
    score_label: ClassVar[str] = "score"  # what the map's numbers are ("score"; SlimGPT: "OBS error")
    # shares of the layers (first, last) width pruning leaves whole by default (allocation's skip_first/skip_last
    # "auto"); (0, 0): every layer is prunable, as in Wanda-sp, FLAP, MINI-LLM and SlimGPT
    kept_whole: ClassVar[tuple[float, float]] = (0.0, 0.0)
    Options: ClassVar[type] = NoOptions

    def score(self, model: nn.Module, calib: Calibration | None, options: Any, ctx: Context) -> ImportanceMap:
        raise NotImplementedError

    def estimate(self, geometry: Geometry, n_params: int, samples: int, seq_len: int, options: Any) -> dict:
        """Rough cost before running: ``{"forward_tokens": ..., "backward": bool, "extra_bytes": ...}``."""
        return {"forward_tokens": samples * seq_len if self.needs_calibration else 0,
                "backward": self.uses_gradients, "extra_bytes": 0}


REGISTRY: dict[str, Criterion] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: add a criterion to the registry under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"criterion {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def load_builtin_criteria() -> None:
    """Import :mod:`pruneviz.criteria`, which registers the built-in criteria and their compensators (at call
    time: the criteria import this module)."""
    from . import criteria  # noqa: F401  (registers the built-in criteria)


def available() -> dict[str, Criterion]:
    load_builtin_criteria()
    return dict(REGISTRY)


def usable_criteria(model: nn.Module) -> dict[str, Criterion]:
    """The criteria that can score ``model``: all of them, or only the layer-wise ones (``Criterion.layerwise``)
    when it is offloaded (:func:`pruneviz.loading.load_offloaded`); the others need the whole model resident."""
    crits = available()
    return {n: c for n, c in crits.items() if c.layerwise} if is_offloaded(model) else crits


def get(name: str) -> Criterion:
    load_builtin_criteria()
    if name not in REGISTRY:
        raise CriterionError(f"unknown criterion {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def make_options(name: str, **values) -> Any:
    """The options dataclass of criterion ``name`` with ``values`` overriding defaults (unknown keys rejected)."""
    cls = get(name).Options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise CriterionError(f"{name} has no option(s) {sorted(unknown)}; its options are {sorted(known)}")
    return cls(**values)


# ---- peak memory -----------------------------------------------------------------------------------------------------

def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator peak on GPU, process peak RSS (VmHWM) on CPU."""

    device: str = "cpu"
    start: int | None = None
    peak: int | None = None

    @property
    def extra(self) -> int | None:
        """Peak minus what was in use at the start (what the work itself needed)."""
        return None if self.peak is None or self.start is None else max(self.peak - self.start, 0)


@contextmanager
def peak_memory(device) -> Iterator[PeakMemory]:
    dev = torch.device(device)
    rec = PeakMemory(dev.type)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        rec.start = torch.cuda.memory_allocated(dev)
        yield rec
        torch.cuda.synchronize(dev)
        rec.peak = torch.cuda.max_memory_allocated(dev)
        return
    try:  # reset the kernel's peak-RSS counter (Linux); harmless if unavailable
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rec.start = _rss_bytes("VmRSS")
    yield rec
    rec.peak = _rss_bytes("VmHWM")


def refuse_offloaded(model: nn.Module, what: str) -> None:
    """Raise a CriterionError if ``model`` is offloaded: ``what`` needs the whole model resident."""
    if is_offloaded(model):
        ok = ", ".join(sorted(name for name, crit in REGISTRY.items() if crit.layerwise))
        raise CriterionError(
            f"{what} needs the whole model in memory, but this model is offloaded layer by layer. Use a "
            f"layer-wise criterion ({ok}), or load it without offloading on a larger device.")


# ---- running a criterion ---------------------------------------------------------------------------------------------

def compute(model: nn.Module, name: str, calib: Calibration | None = None, options: Any = None,
            progress: Progress | None = None, cancel: Cancel | None = None) -> ImportanceMap:
    """Run criterion ``name`` on ``model`` (never mutated) and record time, memory and inputs in ``meta``."""
    crit = get(name)
    options = options if options is not None else crit.Options()
    if crit.needs_calibration and calib is None:
        raise CriterionError(f"{name} needs calibration text; pass calibration windows (pruneviz.data)")
    if getattr(model.config, "pruneviz_base_geometry", None):
        raise CriterionError("score the dense base model, not an already pruned one")
    if not crit.layerwise:
        refuse_offloaded(model, f"the {name} criterion")
    if calib is not None and crit.needs_calibration:
        check_context(model, int(calib.tokens.shape[-1]), "a calibration window (seq_len)", "use shorter windows")
    ctx = Context(progress, cancel)
    device = execution_device(model)
    # every pass runs on a view sharing model's tensors: its hooks, replaced forwards, requires_grad flags and
    # gradients are this call's only, so several calls on one shared base model can run at once
    view = clone_model(model, share_weights=True, own_parameters=not is_offloaded(model))
    t0 = time.perf_counter()
    try:
        with peak_memory(device) as mem:
            result = crit.score(view, calib, options, ctx)
    except Cancelled:
        raise
    except (RuntimeError, MemoryError) as e:
        if is_oom(e) or isinstance(e, MemoryError):
            raise oom_advice(e, f"scoring with {name}") from e
        raise
    result.meta.update({
        "criterion": name, "options": dataclasses.asdict(options), "seconds": time.perf_counter() - t0,
        "peak_memory_bytes": mem.peak, "extra_memory_bytes": mem.extra, "device": str(device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "offloaded": is_offloaded(model),
        "calibration": calib.describe() if calib is not None and crit.needs_calibration else None,
        "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
        "pid": os.getpid(), "model": str(getattr(model.config, "_name_or_path", "") or ""),
        "probe": list(weight_probe(model)),
    })
    if progress:
        progress(1.0, "done")
    return result

