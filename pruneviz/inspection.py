"""Inspect a prompt: what each attention head and MLP of a dense model does for the tokens of one text.

Three questions, one function each:

- :func:`inspect_prompt`: per layer and query head the attention pattern ``[H, T, T]``, each head's contribution
  to the residual stream (its slice of the attention output projection, ``W_o[:, h] · z_h``: norm per position),
  each MLP's output norm, and the norm of the residual stream itself. One forward pass on an eager-attention
  *copy* of the model (a clone sharing its tensors, :func:`pruneviz.offload.clone_model`), so the shared base's
  attention implementation, hooks and weights are never touched.
- :func:`removal_effects`: the change in log-probability of one next token when each query head, KV group or
  whole MLP is removed, by zeroing what the unit owns at the output projections' inputs (exactly removing the
  unit, as :func:`pruneviz.surgery.masking` does), many units per batched forward pass.
- :func:`plan_effect`: what the units a plan removes did for each token of the prompt: dense vs pruned
  next-token top-k per position and the per-token loss change (:func:`pruneviz.fidelity.token_fidelity`),
  largest change first.

Positions: the prompt is tokenized as :func:`pruneviz.evaluate.token_losses` reads a text (no special tokens, a
BOS token prepended when the tokenizer has one); position ``t`` reads token ``t`` and predicts token ``t + 1``.

Which units exist and which input features of which projection they own is asked of the family's adapter
(:mod:`pruneviz.arch`); nothing here names a family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Adapter, Geometry, adapter_for, feature_count, geometry_of, get_path, weight_axis
from .data import leading_ids
from .errors import PlanError, TextError
from .fidelity import token_fidelity
from .limits import check_context
from .offload import clone_model, execution_device, materialized

__all__ = ["EFFECT_KINDS", "Inspection", "PlanEffect", "RemovalEffects", "TokenChange", "inspect_prompt",
           "plan_effect", "prompt_ids", "removal_effects"]

EFFECT_KINDS = ("head", "kv", "mlp")  # what removal_effects can remove: a query head, a KV group, a whole MLP


# ---- the prompt ---------------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, text: str, max_tokens: int = 64) -> list[int]:
    """The token ids inspected for ``text``: its first ``max_tokens`` tokens (no special tokens), a BOS token
    prepended when the tokenizer has one, as :func:`pruneviz.evaluate.token_losses` reads a text. Raises
    :class:`TextError` for a text without tokens."""
    ids, bos = leading_ids(tokenizer, text, max_tokens, "The prompt is empty. Type a sentence to inspect.",
                           "The prompt produced no tokens. Type some words.")
    return ([bos] if bos is not None else []) + ids


def decode_tokens(tokenizer, ids: Iterable[int]) -> tuple[str, ...]:
    """Each id decoded on its own (what the views label positions with)."""
    return tuple(tokenizer.decode([int(i)]) for i in ids)


def _check_dense(model: nn.Module) -> None:
    cfg = model.config
    if getattr(cfg, "pruneviz_base_geometry", None) or getattr(cfg, "pruneviz_masked_plan", None):
        raise PlanError("inspect the dense base model: the units of a pruned or masked model no longer sit where "
                        "the dense geometry says (compare plans with plan_effect instead)")


def _ids_tensor(model: nn.Module, ids: list[int]) -> torch.Tensor:
    check_context(model, len(ids), "the prompt", "use a shorter prompt or fewer tokens")
    return torch.tensor([ids], dtype=torch.long, device=execution_device(model))  # [1, T]


# ---- attention patterns and contributions -------------------------------------------------------------------------

@dataclass
class Inspection:
    """What :func:`inspect_prompt` measured on one prompt of ``T`` tokens (CPU float32 tensors).

    * ``attention`` ``[L, H, T, T]``: row ``t`` is how query position ``t`` of head ``h`` spreads its attention over
      the key positions (rows sum to 1; zero above the diagonal).
    * ``head_norm`` ``[L, H, T]``: L2 norm of head ``h``'s contribution ``W_o[:, h·d:(h+1)·d] · z_h(t)`` (its slice
      through the attention output projection).
    * ``attn_norm`` ``[L, T]``: norm of the whole attention output (all heads plus the projection's bias).
    * ``mlp_norm`` ``[L, T]``: norm of the MLP output.
    * ``stream_norm`` ``[L + 1, T]``: norm of the residual stream entering each block, and (last row) leaving the
      last block, i.e. the final hidden state before the final norm.
    * ``additive``: True when each block's update of the residual stream *is* its attention output plus its MLP
      output (measured on this prompt): then embeddings + every head + every attention bias + every MLP equals
      the final hidden state. False for families that normalise the outputs before the residual add (Gemma 2/3,
      OLMo 2) or scale them (Granite's residual multiplier): the contributions are then measured at the output
      projections, before that norm or scale.
    * ``parts`` (only with ``keep_vectors``): the vectors themselves, ``embed`` ``[T, D]`` (the stream entering
      block 0), ``heads`` ``[L, H, T, D]``, ``attn_bias`` ``[L, D]``, ``mlp`` ``[L, T, D]``, ``final`` ``[T, D]``.
    """

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    attention: torch.Tensor
    head_norm: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    stream_norm: torch.Tensor
    additive: bool
    parts: dict | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


class _Capture:
    """Forward hooks on a clone that keep, per block, its input and output hidden states, the attention output
    projection's input and output and the MLP output (batch row 0, detached)."""

    def __init__(self, view: nn.Module, adapter: Adapter):
        n = len(adapter.layers(view))
        self.block_in: list = [None] * n
        self.block_out: list = [None] * n
        self.z: list = [None] * n  # [T, H·d] attention output projection inputs (concatenated head outputs)
        self.attn: list = [None] * n  # [T, D]
        self.mlp: list = [None] * n  # [T, D]
        self.handles = []
        for i, layer in enumerate(adapter.layers(view)):
            self.handles += [
                layer.register_forward_pre_hook(self._keep_in(i, adapter), with_kwargs=True),
                layer.register_forward_hook(self._keep(self.block_out, i)),
                get_path(layer, adapter.attn_out).register_forward_pre_hook(self._keep_input(self.z, i)),
                get_path(layer, adapter.attn_out).register_forward_hook(self._keep(self.attn, i)),
                get_path(layer, adapter.mlp_out).register_forward_hook(self._keep(self.mlp, i)),
            ]

    @staticmethod
    def _row0(x) -> torch.Tensor:
        """The hidden state ``[1, T, F]`` of the one-row batch (a module output's first element) as ``[T, F]``;
        some families (OPT's MLP) flatten it to ``[T, F]`` already."""
        x = x[0] if isinstance(x, (tuple, list)) else x
        return x.detach().reshape(-1, x.shape[-1])

    def _keep_in(self, i: int, adapter: Adapter):
        def hook(module, args, kwargs):
            self.block_in[i] = self._row0(adapter.block_hidden(args, kwargs))
        return hook

    def _keep_input(self, store: list, i: int):
        def hook(module, args):
            store[i] = self._row0(args[0])
        return hook

    def _keep(self, store: list, i: int):
        def hook(module, args, output):
            store[i] = self._row0(output)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def eager_view(model: nn.Module) -> nn.Module:
    """A clone of ``model`` sharing its tensors whose attention is computed eagerly (so it can return its
    attention weights); ``model`` itself keeps its attention implementation."""
    view = clone_model(model, share_weights=True)
    try:
        view.set_attn_implementation("eager")
    except (AttributeError, ValueError):  # older or custom models: the config attribute is what they read
        view.config._attn_implementation = "eager"
    return view


def output_columns(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as ``[out, in]`` (an HF ``Conv1D`` stores it as ``[in, out]``)."""
    w = module.weight
    return w if weight_axis(module, "in") == 1 else w.t()


def head_contributions(module: nn.Module, z: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Each head's share of the output projection ``module`` on inputs ``z`` ``[T, H·d]``: ``[H, T, D]``, with
    ``sum_h out[h] + bias == module(z)``."""
    w = output_columns(module).float().view(-1, n_heads, head_dim)  # [D, H, d]
    zh = z.float().view(z.shape[0], n_heads, head_dim)  # [T, H, d]
    return torch.einsum("thd,ohd->hto", zh, w)  # [H, T, D]


def _bias(module: nn.Module, width: int, device) -> torch.Tensor:
    b = getattr(module, "bias", None)
    return b.detach().float() if b is not None else torch.zeros(width, device=device)  # [D]


def _is_additive(cap: _Capture, dtype: torch.dtype) -> bool:
    """Whether every block's update equals its attention plus MLP output, within rounding of ``dtype``."""
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    for x_in, x_out, a, m in zip(cap.block_in, cap.block_out, cap.attn, cap.mlp):
        update = (x_out.float() - x_in.float())  # [T, D]
        if (update - a.float() - m.float()).abs().max() > tol * max(1.0, float(update.abs().max())):
            return False
    return True


def inspect_prompt(model: nn.Module, tokenizer, prompt: str, max_tokens: int = 64,
                   keep_vectors: bool = False) -> Inspection:
    """Attention patterns and residual-stream contributions of ``model`` (dense) on ``prompt`` (:class:`Inspection`).

    Cost: one forward pass over the prompt's ``T <= max_tokens + 1`` tokens on an eager-attention clone (the
    attention weights ``[L, H, T, T]`` are materialised), plus one ``[H, T, D]`` product per layer for the heads'
    contributions. ``keep_vectors`` also returns the contribution vectors (``L·H·T·D`` floats) for checks.
    The shared ``model`` is not changed (hooks live on the clone). Raises :class:`TextError` for an empty or too
    long prompt, :class:`PlanError` for a pruned or masked model.
    """
    _check_dense(model)
    adapter, g = adapter_for(model), geometry_of(model)
    ids = prompt_ids(tokenizer, prompt, max_tokens)
    view = eager_view(model)
    cap = _Capture(view, adapter)
    try:
        with torch.inference_mode():
            out = view(input_ids=_ids_tensor(model, ids), use_cache=False, output_attentions=True)
    finally:
        cap.remove()
    attention = torch.stack([a[0].float().cpu() for a in out.attentions])  # [L, H, T, T]
    heads, head_norm, biases = [], [], []
    for i, layer in enumerate(adapter.layers(view)):
        with torch.inference_mode(), materialized(layer):  # an offloaded block's weights are read from its store
            proj = get_path(layer, adapter.attn_out)
            contrib = head_contributions(proj, cap.z[i], g.n_heads, g.head_dim)  # [H, T, D]
            biases.append(_bias(proj, contrib.shape[-1], contrib.device).cpu())  # [D]
        head_norm.append(contrib.norm(dim=-1).cpu())  # [H, T]
        if keep_vectors:
            heads.append(contrib.cpu())
    stream = cap.block_in + [cap.block_out[-1]]
    parts = None
    if keep_vectors:
        parts = {"embed": cap.block_in[0].float().cpu(), "heads": torch.stack(heads),
                 "attn_bias": torch.stack(biases), "mlp": torch.stack([m.float().cpu() for m in cap.mlp]),
                 "final": cap.block_out[-1].float().cpu()}
    return Inspection(
        tokens=decode_tokens(tokenizer, ids), ids=tuple(ids), attention=attention,
        head_norm=torch.stack(head_norm),  # [L, H, T]
        attn_norm=torch.stack([a.float().norm(dim=-1).cpu() for a in cap.attn]),  # [L, T]
        mlp_norm=torch.stack([m.float().norm(dim=-1).cpu() for m in cap.mlp]),  # [L, T]
        stream_norm=torch.stack([s.float().norm(dim=-1).cpu() for s in stream]),  # [L + 1, T]
        additive=_is_additive(cap, next(model.parameters()).dtype), parts=parts)


# ---- removal effects ----------------------------------------------------------------------------------------------

@dataclass
class RemovalEffects:
    """The change of ``log p(target)`` at ``position`` when one unit is removed (the rest of the model dense).

    ``head`` ``[L, H]``, ``kv`` ``[L, G]`` and ``mlp`` ``[L]`` hold ``log p_removed - log p_dense`` (nats;
    negative: the unit helped predict ``target``), or None for kinds not asked for. ``target`` is the prompt's own
    next token (``actual``) or, at the last position, the dense model's top guess. ``logp`` is the dense
    ``log p(target)``; ``forwards`` the batched forward passes run.
    """

    tokens: tuple[str, ...]
    position: int
    target: int
    target_token: str
    actual: bool
    logp: float
    head: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    mlp: torch.Tensor | None = None
    forwards: int = 0

    def get(self, kind: str) -> torch.Tensor | None:
        """Effects of ``kind``: head, kv or mlp."""
        if kind not in EFFECT_KINDS:
            raise PlanError(f"removal effects exist for {', '.join(EFFECT_KINDS)}, not {kind!r}")
        return getattr(self, kind)


def unit_features(adapter: Adapter, g: Geometry, kind: str, index: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """What removing one unit zeroes, as ``(module path, axis, features)``: its input columns of the attention
    output projection (and of whole-projection norms' inputs: the rows of :attr:`Adapter.proj_norms`' projections
    it owns), or the MLP down projection's whole input for ``kind == "mlp"``."""
    if kind == "mlp":
        return [(adapter.mlp_out, "in", tuple(range(g.n_channels)))]
    sites = set(ablation_sites(adapter))
    return [(s.module, s.axis, s.index) for s in adapter.unit_slices(g, kind, index) if (s.module, s.axis) in sites]


def ablation_sites(adapter: Adapter) -> list[tuple[str, str]]:
    """Where removal zeroes features, as ``(module path, axis)``: the inputs of both output projections and the
    outputs of projections that a whole-projection norm reads."""
    return [(adapter.attn_out, "in"), (adapter.mlp_out, "in")] + [(p, "out") for p in adapter.proj_norms]


class _Ablation:
    """Hooks on a clone that zero, for batch row ``b``, the features ``masks[(layer, path, axis)][b] == 0``."""

    def __init__(self, view: nn.Module, adapter: Adapter):
        self.masks: dict[tuple[int, str, str], torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(adapter.layers(view)):
            for path, axis in ablation_sites(adapter):
                mod = get_path(layer, path)
                if axis == "in":
                    self.handles.append(mod.register_forward_pre_hook(self._zero_input((i, path, axis))))
                else:
                    self.handles.append(mod.register_forward_hook(self._zero_output((i, path, axis))))

    def _apply(self, key, x: torch.Tensor) -> torch.Tensor | None:
        keep = self.masks.get(key)  # [B, F]
        if keep is None:
            return None
        rows = x.reshape(keep.shape[0], -1, x.shape[-1])  # [B, T, F] (OPT's MLP flattens to [B·T, F])
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(keep.to(x.device)[:, None, :], rows, zero).view(x.shape)

    def _zero_input(self, key):
        def hook(module, args):
            new = self._apply(key, args[0])  # [B, T, F]
            return None if new is None else (new,) + tuple(args[1:])
        return hook

    def _zero_output(self, key):
        def hook(module, args, output):
            return self._apply(key, output)
        return hook

    def set_rows(self, rows: list[list[tuple[int, str, str, tuple[int, ...]]]], widths: dict) -> None:
        """Row ``b`` of the next batch zeroes the features ``rows[b]`` lists as ``(layer, path, axis, features)``."""
        masks: dict = {}
        for b, feats in enumerate(rows):
            for layer, path, axis, idx in feats:
                key = (layer, path, axis)
                if key not in masks:
                    masks[key] = torch.ones(len(rows), widths[(path, axis)], dtype=torch.bool)  # [B, F]
                masks[key][b, list(idx)] = False
        self.masks = masks

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def last_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of ``batch`` ``[B, t]``: ``[B, V]`` (only that position is projected when the
    model accepts ``logits_to_keep``)."""
    try:
        out = model(input_ids=batch, use_cache=False, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = model(input_ids=batch, use_cache=False)
    return out.logits[:, -1]


def effect_units(g: Geometry, kinds: Iterable[str]) -> list[tuple[str, int, int]]:
    """Every unit :func:`removal_effects` removes for ``kinds``, as ``(kind, layer, index)``, layer by layer."""
    counts = {"head": g.n_heads, "kv": g.n_kv, "mlp": 1}
    kinds = list(kinds)
    bad = [k for k in kinds if k not in counts]
    if bad:
        raise PlanError(f"removal effects exist for {', '.join(EFFECT_KINDS)}, not {', '.join(map(repr, bad))}")
    return [(k, layer, i) for k in kinds for layer in range(g.n_layers) for i in range(counts[k])]


def removal_effects(model: nn.Module, tokenizer, prompt: str, position: int | None = None,
                    kinds: Iterable[str] = EFFECT_KINDS, batch_size: int = 16, max_tokens: int = 64,
                    progress=None, cancel=None) -> RemovalEffects:
    """How much each query head, KV group and whole MLP of ``model`` (dense) contributes to predicting the next
    token at ``position`` of ``prompt``: ``log p`` of that token with the unit removed minus with it present.

    Removing a unit zeroes its input columns of the attention output projection (a KV group: all of its query
    heads), plus, for whole-projection q/k norms (OLMo 2), its rows before the norm; an MLP: the down projection's
    whole input (a bias stays, as surgery keeps it). That is exactly the masked preview of a plan removing that
    unit (:func:`pruneviz.surgery.masking`), up to float rounding. ``position`` defaults to the last position
    whose next token is in the prompt (the last position: the dense model's top guess is scored).

    Cost: ``L·(H + G + 1)`` units for all kinds (SmolLM2-135M: 30·(9 + 3 + 1) = 390), run ``batch_size`` units per
    forward pass over the ``position + 1`` tokens that can influence the prediction (later tokens cannot), only
    the last position projected to the vocabulary: ``1 + ceil(units / batch_size)`` passes of
    ``batch_size × (position + 1)`` tokens. Hooks live on a clone sharing the tensors; ``model`` is not changed.
    ``progress(fraction, message)`` after each pass; when ``cancel()`` returns True the units not measured yet
    stay NaN.
    """
    _check_dense(model)
    adapter, g = adapter_for(model), geometry_of(model)
    ids = prompt_ids(tokenizer, prompt, max_tokens)
    pos = max(len(ids) - 2, 0) if position is None else int(position)
    if not 0 <= pos < len(ids):
        raise TextError(f"position {pos} is outside the prompt's {len(ids)} tokens (0..{len(ids) - 1})")
    seq = _ids_tensor(model, ids[:pos + 1])  # [1, pos + 1]
    view = clone_model(model, share_weights=True)
    units = effect_units(g, kinds)
    widths = {(p, a): feature_count(get_path(adapter.layers(view)[0], p), a) for p, a in ablation_sites(adapter)}
    ablation = _Ablation(view, adapter)
    deltas = torch.full((len(units),), float("nan"))  # [U]
    forwards = 1
    try:
        with torch.inference_mode():
            dense = F.log_softmax(last_logits(view, seq)[0].float(), dim=-1)  # [V]
            actual = pos + 1 < len(ids)
            target = ids[pos + 1] if actual else int(dense.argmax())
            base = float(dense[target])
            for start in range(0, len(units), batch_size):
                if cancel is not None and cancel():
                    break
                chunk = units[start:start + batch_size]
                ablation.set_rows([[(layer, *f) for f in unit_features(adapter, g, k, i)] for k, layer, i in chunk],
                                  widths)
                lp = F.log_softmax(last_logits(view, seq.expand(len(chunk), -1)).float(), dim=-1)  # [B, V]
                deltas[start:start + len(chunk)] = lp[:, target].cpu() - base
                forwards += 1
                if progress is not None:
                    progress(min(1.0, (start + len(chunk)) / len(units)), f"units {start + len(chunk)}/{len(units)}")
    finally:
        ablation.remove()
    return RemovalEffects(decode_tokens(tokenizer, ids), pos, target, tokenizer.decode([target]), actual, base,
                          forwards=forwards, **_by_kind(units, deltas, g))


def _by_kind(units: list[tuple[str, int, int]], deltas: torch.Tensor, g: Geometry) -> dict:
    shapes = {"head": (g.n_layers, g.n_heads), "kv": (g.n_layers, g.n_kv), "mlp": (g.n_layers,)}
    out = {}
    for kind, shape in shapes.items():
        rows = [j for j, u in enumerate(units) if u[0] == kind]
        if rows:
            out[kind] = deltas[rows].view(shape)
    return out


# ---- what a plan removed ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenChange:
    """One position of :func:`plan_effect`: reading ``context`` (token ``position``) both models predict
    ``target`` (token ``position + 1``). ``delta = nll_pruned - nll_dense`` (nats; positive: the plan made the
    prediction worse), ``kl`` = KL(dense || pruned) of the two next-token distributions, ``agree``: same top-1.
    ``dense_top`` / ``pruned_top``: the ``k`` most likely next tokens and their probabilities."""

    position: int
    context: str
    target: str
    nll_dense: float
    nll_pruned: float
    delta: float
    kl: float
    agree: bool
    dense_top: tuple[tuple[str, float], ...]
    pruned_top: tuple[tuple[str, float], ...]

    def row(self) -> dict:
        """A flat row for tables."""
        top = lambda pairs: " · ".join(f"{t!r} {p:.0%}" for t, p in pairs)  # noqa: E731
        return {"position": self.position, "reading": self.context, "next": self.target,
                "dense loss": self.nll_dense, "pruned loss": self.nll_pruned, "Δ loss": self.delta, "KL": self.kl,
                "same top-1": self.agree, "dense top": top(self.dense_top), "pruned top": top(self.pruned_top)}


@dataclass(frozen=True)
class PlanEffect:
    """:func:`plan_effect` on one prompt: ``changes`` sorted by ``|delta|``, largest first, and their means."""

    tokens: tuple[str, ...]
    changes: tuple[TokenChange, ...]
    mean_delta: float
    mean_kl: float
    top1_agreement: float
    by_position: tuple[TokenChange, ...] = field(default=(), repr=False)  # the same changes in position order


def _top(lp: torch.Tensor, k: int, tokenizer) -> list[tuple[tuple[str, float], ...]]:
    """Per row of log-probabilities ``[N, V]``: the ``k`` most likely tokens and their probabilities."""
    p, idx = lp.exp().topk(min(k, lp.shape[-1]), dim=-1)  # [N, k] each
    return [tuple((tokenizer.decode([int(i)]), float(q)) for q, i in zip(pr, ir)) for pr, ir in zip(p, idx)]


def plan_effect(dense: nn.Module, pruned: nn.Module, tokenizer, prompt: str, k: int = 5,
                max_tokens: int = 64) -> PlanEffect:
    """What the units a plan removes did for each token of ``prompt``: ``dense`` (the base) vs ``pruned`` (its
    masked view, physically pruned or recovered model) per position, sorted by the loss change.

    One forward pass of each model over the prompt (tokenized as :func:`prompt_ids`); the per-position KL, top-1
    agreement and both losses come from :func:`pruneviz.fidelity.token_fidelity`, the top-k from the same logits.
    Every position with a next token in the prompt is scored (``T - 1`` of them). Raises :class:`TextError` for
    a prompt shorter than two tokens.
    """
    ids = prompt_ids(tokenizer, prompt, max_tokens)
    if len(ids) < 2:
        raise TextError("The prompt needs at least two tokens: one to read and one to predict.")
    batch = _ids_tensor(dense, ids)  # [1, T]
    with torch.inference_mode():
        d = dense(input_ids=batch, use_cache=False).logits[0, :-1].float()  # [T-1, V]
        p = pruned(input_ids=batch.to(execution_device(pruned)), use_cache=False).logits[0, :-1].float().to(d.device)
    targets = batch[0, 1:].to(d.device)  # [T-1]
    kl, agree, nll_d, nll_p = token_fidelity(d, p, targets)  # [T-1] each
    tokens = decode_tokens(tokenizer, ids)
    tops_d, tops_p = _top(F.log_softmax(d, -1), k, tokenizer), _top(F.log_softmax(p, -1), k, tokenizer)
    changes = tuple(TokenChange(t, tokens[t], tokens[t + 1], float(nll_d[t]), float(nll_p[t]),
                                float(nll_p[t] - nll_d[t]), float(kl[t]), bool(agree[t]), tops_d[t], tops_p[t])
                    for t in range(len(ids) - 1))
    ordered = tuple(sorted(changes, key=lambda c: -abs(c.delta)))
    return PlanEffect(tokens, ordered, float((nll_p - nll_d).mean()), float(kl.mean()),
                      float(agree.float().mean()), by_position=changes)
