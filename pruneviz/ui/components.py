"""Small Streamlit components shared by the pages. Each takes a ``key_prefix`` so widget keys never collide.

Components render widgets and call :mod:`pruneviz`; the computations behind them are in
:mod:`pruneviz.ui.analysis`, figures in :mod:`pruneviz.ui.figures`, state in :mod:`pruneviz.ui.state`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import streamlit as st
import torch

from ..arch import UNITS
from ..data import get_text
from ..errors import PlanError, TextError
from ..importance import make_options
from . import analysis, jobs_panel, state, urlstate
from .analysis import MISSING  # noqa: F401 - for the pages' tables: st.dataframe(placeholder=ui.MISSING)
from .compat import ScriptControlException
from .work import Job, show_error

SOURCES = {"bundled": "Bundled SmolLM2-135M-Instruct", "hub": "Hugging Face id", "folder": "Local folder or GGUF file",
           "tiny": "Tiny random model (testing)"}
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["auto", "float32", "bfloat16", "float16"]
OFFLOADS = {"none": "No: the whole model in memory", "disk": "Disk: blocks read one at a time",
            "cpu": "CPU memory: blocks fetched by the GPU"}
SEQ_LENS = [32, 64, 128, 256, 512, 1024, 2048]


# ---- formatting ---------------------------------------------------------------------------------------------------

def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M' (SI prefixes)."""
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {p}{unit}"
    return f"{n:.0f} {unit}".strip()


def human_bytes(n: float) -> str:
    for div, p in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.3g} {p}"
    return f"{n:.0f} B"


def fmt_ppl(x: float) -> str:
    """Perplexities span 5 to 10^6 after heavy pruning: 3 decimals when small, 4 significant digits when huge."""
    if x != x:  # NaN
        return "n/a"
    return f"{x:,.3f}" if x < 1e4 else f"{x:.4g}"


def ppl_delta(new: float, old: float) -> str | None:
    """Change as a percentage, or as a factor once it is more than 10x."""
    if not old or new != new:
        return None
    return f"{(new - old) / old:+.1%}" if new < 10 * old else f"×{new / old:,.0f}"


def split_front_matter(card: str) -> tuple[str, str]:
    """(YAML front matter, body) of a model card; the front matter is shown as code, not as markdown."""
    if card.startswith("---\n"):
        end = card.find("\n---", 4)
        if end != -1:
            return card[4:end], card[end + 4:].lstrip("\n")
    return "", card


def unit_title(kind: str) -> str:
    """A unit kind's plural as a heading: "Query heads", "KV groups", "MLP channels", "Blocks"."""
    plural = UNITS[kind].plural
    return plural[0].upper() + plural[1:]


def human_seconds(s: float) -> str:
    if s < 1:
        return "< 1 s"
    if s < 90:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min"


# ---- the frame around every page (app.py) -------------------------------------------------------------------------
#
# ``app.py`` runs the frame and then ``st.navigation``. Because the project keeps its pages in ``pages/``,
# Streamlit's legacy multipage mode can run a page file *without* the entrypoint: the first run of a server process
# opened on a page URL, and every AppTest rerun. Streamlit marks such runs with the class attribute
# ``PagesManager.uses_pages_directory`` (``st.navigation`` sets it to False), so :func:`page` runs the frame itself
# exactly then.
ASSETS = Path(__file__).resolve().parents[2] / "assets"


def frame_start() -> state.ModelSpec | None:
    """Page config, session defaults, one-time notices and the sidebar model picker; returns a load request."""
    icon, logo = ASSETS / "icon.svg", ASSETS / "logo.svg"
    st.set_page_config(page_title="pruneviz", page_icon=str(icon) if icon.exists() else None, layout="wide")
    if logo.exists():
        st.logo(str(logo), icon_image=str(icon), size="large")
    state.init()
    restored = state.restore_work()  # the page before a reload: its work comes back (pruneviz.ui.state)
    state.keep_work()
    state.drain()
    if restored:
        state.notify(f"Your work from before the page was reloaded is back: {restored}.", "🗂️")
    if st.session_state.pop("picker_sync", False):  # the session switched model from a page: picker follows
        for key in ("model_source", "model_folder", "model_hub_id"):
            st.session_state.pop(key, None)
    url_request = urlstate.start()  # a shared link's model and plan (pruneviz.ui.urlstate)
    for message, emoji in st.session_state.get("notices", []):
        st.toast(message, icon=emoji)
    st.session_state["notices"] = []
    with st.sidebar:
        if state.finishing_job():
            finishing_note()
        st.subheader("Model", anchor=False)
        return model_picker() or url_request


@st.fragment(run_every=1.0)
def finishing_note() -> None:
    """While a stopped job finishes its current step in the old run, say so; rerun the app when it is done."""
    label = state.finishing_job()
    if label:
        st.info(f"Stopping “{label}” after its current step; finished results are kept.",
                icon=":material/hourglass_top:")
    else:
        st.rerun()


def frame_model(requested: state.ModelSpec | None):
    """Load the requested/default model (errors as messages) and show the sidebar status; returns the model."""
    try:
        loaded = ensure_model(requested)
    except ScriptControlException:
        raise
    except Exception as e:  # noqa: BLE001 - shown as a message, never as a traceback
        show_error(e)
        loaded = state.current()
    with st.sidebar:
        sidebar_status(loaded)
        urlstate.finish(loaded)  # persisted runs of this model, the link's plan, the URL
        jobs_panel.panel()  # background jobs of this session: progress, ETA, Cancel; results collected
    return loaded


def page(title: str, subtitle: str):
    """Start a page: the frame if app.py did not run it, the title, and the session's model (or a message and
    ``st.stop()`` when none is loaded). Call once at the top of each page."""
    ensure_frame()
    st.title(title, anchor=False)
    st.caption(subtitle)
    loaded = state.current()
    if loaded is None:
        st.info("No model is loaded. Pick one in the sidebar and press **Load model**.", icon=":material/info:")
        st.stop()
    return loaded


def legacy_page_run() -> bool:
    """True when Streamlit runs a file in ``pages/`` directly, without app.py (legacy multipage mode)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # pragma: no cover - layout changed: assume app.py ran
        return False
    return bool(getattr(PagesManager, "uses_pages_directory", False))


def ensure_frame() -> None:
    if legacy_page_run():
        frame_model(frame_start())


# ---- model picker (sidebar, in app.py) ----------------------------------------------------------------------------

def _seed_picker_defaults(spec: state.ModelSpec) -> None:
    """Start the picker at the session's (or ``$PRUNEVIZ_MODEL``'s) model."""
    if spec.is_tiny or spec.source in ("", "bundled", "default"):
        kind = "tiny" if spec.is_tiny else "bundled"
    else:
        kind = "folder" if Path(spec.source).expanduser().exists() else "hub"
        st.session_state.setdefault("model_folder" if kind == "folder" else "model_hub_id", spec.source)
    st.session_state.setdefault("model_source", kind)
    st.session_state.setdefault("model_device", spec.device if spec.device in DEVICES else "auto")
    st.session_state.setdefault("model_dtype", spec.dtype if spec.dtype in DTYPES else "auto")
    st.session_state.setdefault("model_offload", spec.offload if spec.offload in OFFLOADS else "none")
    st.session_state.setdefault("model_resident", int(spec.resident_layers))


def model_picker() -> state.ModelSpec | None:
    """Source, device and dtype widgets; returns the requested spec when "Load model" is clicked."""
    _seed_picker_defaults(state.session_spec())
    kind = st.selectbox("Model source", list(SOURCES), format_func=SOURCES.get, key="model_source",
                        help="The bundled model works offline. Hub ids need the model in the local HF cache "
                             "when offline.")
    source = {"bundled": "bundled", "tiny": state.TINY}.get(kind, "")
    if kind == "hub":
        source = st.text_input("Hugging Face id", key="model_hub_id", placeholder="HuggingFaceTB/SmolLM2-360M")
    elif kind == "folder":
        source = st.text_input("Folder (config.json + *.safetensors, or a GGUF export) or a .gguf file",
                               key="model_folder", placeholder="/path/to/model or /path/to/model.gguf",
                               help="A .gguf file is de-quantised to float32 once and cached (CLI: cache list / "
                                    "clear); per-layer (deci) files that pruneviz exported load too.")
    c1, c2 = st.columns(2)
    device = c1.selectbox("Device", DEVICES, key="model_device", help="auto: CUDA, then MPS, then CPU")
    dtype = c2.selectbox("dtype", DTYPES, key="model_dtype", help="auto: float32 on CPU, bfloat16 on GPU")
    trust = st.checkbox("Trust remote code", key="model_trust", disabled=kind in ("bundled", "tiny"),
                        help="Run Python code shipped with the model. Only for sources you trust.")
    offload, resident = offload_controls(kind, device)
    if st.button("Load model", key="model_load", type="primary", icon=":material/download:", width="stretch"):
        if not source.strip():
            st.warning("Type a Hugging Face id or a folder path first.")
            return None
        if offload == "cpu" and not _computes_on_cuda(device):
            st.warning("CPU offload needs a CUDA GPU to compute on; choose disk offload here.")
            return None
        return state.ModelSpec(source.strip(), device, dtype, bool(trust and kind in ("hub", "folder")), offload,
                               resident if offload != "none" else 0)
    return None


def _computes_on_cuda(device: str) -> bool:
    return device in ("auto", "cuda") and torch.cuda.is_available()


def offload_controls(kind: str, device: str) -> tuple[str, int]:
    """Offload mode ("none", "disk", "cpu") and the number of blocks kept on the device, for the model picker."""
    local = kind in ("bundled", "folder", "hub")
    offload = st.selectbox(
        "Offload blocks (models larger than memory)", list(OFFLOADS), format_func=OFFLOADS.get, key="model_offload",
        disabled=not local,
        help="Keep the decoder blocks on disk (or, computing on a GPU, in CPU memory) and bring one at a time to "
             "the device: layer-wise criteria (magnitude, Wanda-sp, FLAP, SlimGPT) score block by block. Needs the "
             "bundled model, a local folder or a Hub id with safetensors weights." if local else
             "Offloaded loading reads the bundled model, a local folder or a Hub id with safetensors weights.")
    offload = offload if local else "none"
    if offload == "cpu" and not _computes_on_cuda(device):
        st.caption(":material/warning: No CUDA GPU for this device choice: CPU offload would compute on the CPU, "
                   "where it saves nothing. Use disk.")
    resident = st.number_input("Blocks kept on the device", 0, 10_000, step=1, key="model_resident",
                               disabled=offload == "none",
                               help="The first blocks stay on the device (faster); the rest are offloaded.")
    return offload, int(resident)


def switch_to(spec: state.ModelSpec) -> None:
    """Make ``spec`` the session's model; say what of the previous one is kept (it comes back when loaded again)."""
    old = st.session_state.get("model_spec")
    state.use_model(spec)
    kept = state.kept_work(old) if old is not None and old.key != spec.key else None
    if kept:
        st.toast(f"{old.source} is set aside with its work ({kept}); load it again to get it back.", icon="🗂️")


def ensure_model(requested: state.ModelSpec | None):
    """Load the requested (or, on first run, the default) model with progress; returns the session's model.

    A failed load leaves the previous model in place and shows what to do.
    """
    spec = requested or state.session_spec()
    if state.is_loaded(spec):
        switch_to(spec)
        return state.current()
    if requested is None and state.current() is not None:
        return state.current()
    with Job(f"Loading {spec.source}…", key="model_job", cancellable=False) as job:
        loaded = state.load_base(spec, progress=job.progress)
        job.done_label = f"Loaded {loaded.name} in {loaded.load_seconds:.1f} s"
    if job.ok:
        switch_to(spec)
    return state.current()


_PLAN_SLOTS: dict[str, typing.Any] = {}  # session id -> the sidebar's plan line of its current run


def sidebar_status(loaded) -> None:
    """A compact card: loaded model and the session's plan (the plan line is redrawn by :func:`plan_line` once a
    page has changed the plan in the same run)."""
    if loaded is None:
        return
    where = loaded.info.get("offload")
    st.caption(f"**{loaded.name}** · {loaded.device} · {str(loaded.dtype).replace('torch.', '')}"
               + (f" · blocks offloaded ({where})" if where else ""))
    _PLAN_SLOTS[state.session_id()] = st.empty()
    plan_line(loaded)


def plan_line(loaded) -> None:
    """(Re)draw the sidebar's line on the session's plan; a page calls it after changing the plan."""
    slot = _PLAN_SLOTS.get(state.session_id())
    if slot is None or loaded is None:
        return
    with slot.container():
        if state.is_exported(loaded):
            plan = state.exported_plan(loaded)
            st.caption(":material/inventory_2: An exported, already pruned checkpoint"
                       + (f" ({plan.summary()}, base {plan.base.name})" if plan is not None else ""))
            return
        plan = state.get_plan(loaded)
        st.caption(f"Plan: {'nothing removed' if plan.is_empty() else plan.summary()}")
        if state.pruned_for(plan) is not None:
            st.caption(":material/check_circle: pruned model built for this plan")


def exported_gate(loaded, what: str, key_prefix: str) -> None:
    """On pages that make plans (Importance, Prune): for an exported checkpoint, say that it is explored through its
    base and offer to load the base with the plan the export carries; then stop the page. No-op for a dense model.

    An export's layers have their own widths and its unit numbers are not its base's, so it is not a base for new
    plans; loading its base with the carried plan shows the same model as a plan that can be edited."""
    if not state.is_exported(loaded):
        return
    plan = state.exported_plan(loaded)
    st.info(f"This is an exported, already pruned checkpoint{f' ({plan.summary()})' if plan else ''}. An exported "
            f"model is explored through its base: load the dense base model with the plan it carries, then {what}. "
            "Chat, Evaluate and Export work on the exported model as it is.", icon=":material/inventory_2:")
    spec = state.base_spec(plan, state.session_spec()) if plan is not None else None
    if plan is None:
        st.caption("It records no plan: load its dense base model from the sidebar.")
    elif spec is None:
        st.caption(f"Its base `{plan.base.name}` is not the bundled model or a folder here: load it from the "
                   "sidebar, then load the plan file (Export page).")
    elif st.button("Load its base with this plan", key=f"{key_prefix}_load_base", type="primary",
                   icon=":material/restore_page:", help=f"Loads {plan.base.name} and makes the export's plan the "
                   "session's plan; this checkpoint's work is kept and comes back when you load it again."):
        load_base_with_plan(spec, plan)
    st.stop()


def load_base_with_plan(spec: state.ModelSpec, plan) -> None:
    """Load ``spec`` (a dense base) as the session's model and make ``plan`` (validated against it) its plan."""
    loaded = ensure_model(spec)
    if state.session_spec().key != spec.key or loaded is None:
        return  # the load failed: its message is shown
    try:
        plan = plan.validate(loaded.model, physical=False)
    except PlanError as e:
        show_error(e)
        return
    state.set_plan(plan)
    st.session_state["picker_sync"] = True
    state.notify(f"Loaded {loaded.name} with the export's plan ({plan.summary()}).", "✅")
    st.rerun()


# ---- criterion options, calibration --------------------------------------------------------------------------------

def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _unwrap_optional(t):
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return t, False


def option_widget(name: str, t, default, key: str, help_text: str | None):
    """One widget for a dataclass field of type ``t`` (bool/int/float/str/Literal/tuple of ints)."""
    t, optional = _unwrap_optional(t)
    label = name.replace("_", " ")
    if typing.get_origin(t) is Literal:
        choices = list(typing.get_args(t))
        return st.selectbox(label, choices, index=choices.index(default) if default in choices else 0, key=key,
                            help=help_text)
    if t is bool:
        return st.checkbox(label, value=bool(default), key=key, help=help_text)
    if t is int:
        return st.number_input(label, value=None if default is None else int(default), step=1, key=key,
                               help=help_text, placeholder="default")
    if t is float:
        return st.number_input(label, value=None if default is None else float(default), format="%g", key=key,
                               help=help_text, placeholder="default")
    if t is str:
        return st.text_input(label, value=default or "", key=key, help=help_text)
    if typing.get_origin(t) is tuple:
        text = st.text_input(label + " (comma-separated)", value=", ".join(map(str, default or ())), key=key,
                             help=help_text)
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    return default


def criterion_options(crit, key_prefix: str):
    """Widgets for every field of ``crit.Options``; returns the options object (library defaults pre-filled)."""
    cls = crit.Options
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back to the defaults' types
        hints = {}
    values = {}
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        t = hints.get(f.name, type(default))
        v = option_widget(f.name, t, default, f"{key_prefix}_{crit.name}_{f.name}", f.metadata.get("help"))
        if v is not None or default is None:
            values[f.name] = v
    return make_options(crit.name, **values)


@dataclass
class TextChoice:
    name: str
    text: str


def text_picker(part: str, key_prefix: str) -> TextChoice | None:
    """Bundled text, an uploaded file, pasted text or a Hugging Face dataset; None (with a message) on error."""
    options = {"default": "Bundled (Python docs, held-out split)" if part == "eval" else
               "Bundled (Python docs, calibration split)", "upload": "Upload a .txt file", "paste": "Paste text",
               "hf": "Hugging Face dataset (online or cached only)"}
    kind = st.selectbox("Text", list(options), format_func=options.get, key=f"{key_prefix}_text_kind")
    try:
        if kind == "default":
            calib, evals = state.default_texts()
            return TextChoice("bundled:pydoc-" + part, calib if part == "calib" else evals)
        if kind == "upload":
            f = st.file_uploader(f"Text file (UTF-8, at most {state.MAX_UPLOAD_MB} MB)", type=["txt", "md"],
                                 key=f"{key_prefix}_upload", max_upload_size=state.MAX_UPLOAD_MB)
            return TextChoice(f"file:{f.name}", state.read_upload(f)) if f is not None else None
        if kind == "paste":
            text = st.text_area("Text", key=f"{key_prefix}_paste", height=140,
                                placeholder="Paste a few thousand words of representative text…")
            return TextChoice("pasted", text) if text.strip() else None
        name = st.selectbox("Dataset", ["wikitext2", "c4", "ptb"], key=f"{key_prefix}_hf")
        if st.toggle("Load it", key=f"{key_prefix}_hf_go", help="Needs network or a local Hugging Face cache."):
            return TextChoice(f"hf:{name}", get_text(f"hf:{name}", part))
        return None
    except Exception as e:  # noqa: BLE001 - TextError says what to do; others get a short message
        show_error(e)
        return None


@dataclass
class CalibSettings:
    text: TextChoice | None
    n_samples: int
    seq_len: int
    seed: int


def calibration_controls(loaded, key_prefix: str) -> CalibSettings:
    """Calibration text, samples, window length and seed (defaults sized for a CPU: 16 x 128 tokens)."""
    text = text_picker("calib", key_prefix)
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None) or 2048
    lens = [s for s in SEQ_LENS if s <= max_pos] or [max_pos]
    c1, c2, c3 = st.columns(3)
    n = c1.number_input("Samples", 1, 1024, 16, key=f"{key_prefix}_n",
                        help="Random windows drawn from the text (papers use 128; 16 is quick on a CPU).")
    seq = c2.selectbox("Tokens per sample", lens, index=lens.index(128) if 128 in lens else len(lens) - 1,
                       key=f"{key_prefix}_seq")
    seed = c3.number_input("Seed", 0, 2 ** 31 - 1, 0, key=f"{key_prefix}_seed",
                           help="Chooses the windows; the same seed gives the same calibration.")
    return CalibSettings(text, int(n), int(seq), int(seed))


def build_calibration(loaded, cfg: CalibSettings):
    """Calibration windows for ``cfg`` (cached per process); raises TextError when the text is too short."""
    if cfg.text is None:
        raise TextError("Choose a calibration text first (the bundled one works offline).")
    return state.calibration(state.session_spec(), loaded.tokenizer, cfg.text.name, cfg.text.text,
                             cfg.n_samples, cfg.seq_len, cfg.seed)


# ---- costs --------------------------------------------------------------------------------------------------------

def dense_costs(loaded, context: int) -> analysis.Costs:
    key = f"costs|{state.session_spec().key}|{context}"
    hit = state.cached_result(key)
    if hit is None:
        hit = analysis.dense_costs(loaded.model, context)
        state.store_result(key, hit)
    return hit


def dense_costs_of(model, context: int) -> analysis.Costs:
    """Costs measured on a (built) model, cached per model object and context in the session."""
    key = (id(model), context)
    rec = st.session_state.get("_costs")
    if not rec or rec[0] != key:
        rec = (key, analysis.dense_costs(model, context))
        st.session_state["_costs"] = rec
    return rec[1]


def cost_metrics(loaded, plan, context: int) -> analysis.Costs:
    """Four metrics (parameters, non-embedding, FLOPs/token, KV cache) of ``plan`` with deltas against the dense
    model, computed from the plan without surgery (the same numbers the built model measures)."""
    dense = dense_costs(loaded, context)
    now = analysis.plan_costs(loaded.model, plan, dense)
    pct = lambda a, b: f"{(a - b) / b:+.1%}" if b else None  # noqa: E731
    cols = st.columns(4)
    items = [("Parameters", now.params, dense.params, human(now.params), "All weights, tied ones once."),
             ("Non-embedding", now.non_embedding, dense.non_embedding, human(now.non_embedding),
              "Without token/position embeddings and LM head: what pruning can shrink."),
             ("FLOPs / token", now.flops_per_token, dense.flops_per_token, human(now.flops_per_token),
              f"Forward matmuls plus attention with {context} tokens of context."),
             ("KV cache", now.kv_bytes, dense.kv_bytes, human_bytes(now.kv_bytes),
              f"Keys and values for one sequence of {context} tokens.")]
    for col, (label, a, b, shown, help_text) in zip(cols, items):
        col.metric(label, shown, delta=pct(a, b) if a != b else None, delta_color="inverse", border=True,
                   help=help_text + " Computed from the plan; the built model measures the same.")
    return now


# ---- map views ----------------------------------------------------------------------------------------------------

BIN_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def channel_view(g, key_prefix: str, units: int | None = None) -> analysis.View:
    """Layer range, channel range and bin size for a channel heatmap (defaults: all, ~48 bins)."""
    n = units or g.n_channels
    auto = next((b for b in BIN_SIZES if n / b <= 48), BIN_SIZES[-1])
    c1, c2, c3 = st.columns([1, 2, 2])
    size = c1.selectbox("Bin", BIN_SIZES, index=BIN_SIZES.index(auto), key=f"{key_prefix}_bin",
                        help="Channels per cell (mean score). Zoom in and use 1 to see single channels.")
    layers = c2.slider("Layers", 0, g.n_layers, (0, g.n_layers), key=f"{key_prefix}_layers",
                       help="Show layers from..to (end excluded).") if g.n_layers > 1 else (0, 1)
    chans = c3.slider("Channels", 0, n, (0, n), key=f"{key_prefix}_chans", help="Zoom to a channel range.")
    if layers[1] <= layers[0]:
        layers = (layers[0], min(layers[0] + 1, g.n_layers))
    if chans[1] <= chans[0]:
        chans = (chans[0], min(chans[0] + 1, n))
    return analysis.View(layers=tuple(layers), units=tuple(chans), bin=int(size))


def map_caption(imap) -> str:
    """One line: time, memory and calibration behind a map."""
    m = imap.meta or {}
    parts = []
    if m.get("seconds") is not None:
        parts.append(f"{human_seconds(m['seconds'])}")
    if m.get("extra_memory_bytes"):
        parts.append(f"+{human_bytes(m['extra_memory_bytes'])} peak")
    cal = m.get("calibration")
    if cal:
        parts.append(f"{cal['samples']}×{cal['seq_len']} tokens of {cal['text']} (seed {cal['seed']})")
    else:
        parts.append("weights only")
    return " · ".join(parts)
