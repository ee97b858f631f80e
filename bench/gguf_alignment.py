"""MLP width alignment and llama.cpp speed: the bundled model with the same MLP width in every layer, several widths.

    .venv/bin/python bench/gguf_alignment.py [--widths 1125,1126,1124,1128,1120] [--repeats 5] [--weight-type f16]

llama.cpp's CPU kernel for prompt processing (``ggml-cpu/llamafile/sgemm.cpp``, tinyBLAS) serves a matrix product
only when the weight has a multiple of 4 rows and a row length that is a multiple of its vector width (8 floats with
AVX2, 16 with AVX-512); otherwise ggml's generic path runs. A kept MLP width is the row count of ``ffn_gate`` /
``ffn_up`` and the row length of ``ffn_down``, so it decides which kernel every layer's MLP gets
(:data:`pruneviz.gguf_export.KERNEL_MULTIPLE`). This script keeps the first ``w`` MLP channels of every layer for
each width ``w`` (no criterion: speed does not depend on which channels or on the weights' values), exports each
model and the dense one to GGUF, and times them interleaved in one run (:func:`pruneviz.speed.compare_ggufs`:
prefill of the prompt in one pass, greedy decode with the KV cache, batch 1; ratios paired by round against the
dense file). Widths that differ by 2-6 channels differ by under 0.5% in bytes, so any gap beyond that is the
kernel. Writes bench/results/gguf_alignment.md and .json.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import load_bundled, write_table

from pruneviz import threads
from pruneviz.arch import geometry_of
from pruneviz.gguf_export import KERNEL_MULTIPLE, write_gguf
from pruneviz.plan import Plan, dense_params
from pruneviz.speed import SpeedProtocol, compare_ggufs, llama_cpp_available, prompt_ids, ratio_spread, ratios
from pruneviz.surgery import apply_plan

WIDTHS = (1125, 1126, 1124, 1128, 1120)  # 1126: FLAP's uniform width at 20% of the bundled model; 1120 = 32 x 35


def width_plan(model, width: int) -> Plan:
    """Every layer keeps its first ``width`` MLP channels."""
    g = geometry_of(model)
    plan = Plan.empty(model, criterion="first channels", note=f"MLP width {width} in every layer")
    for layer in range(g.n_layers):
        plan = plan.with_units("channel", layer, range(width, g.n_channels))
    return plan


def alignment(width: int) -> str:
    """Which of tinyBLAS's conditions a width meets (rows of ffn_gate/up: multiple of 4; row length of ffn_down:
    of 8 for AVX2, 16 for AVX-512 f16/f32, 32 for q8_0/q4_0 blocks)."""
    return ", ".join(f"{m}: {'yes' if width % m == 0 else 'no'}" for m in (4, 8, 16, 32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--weight-type", default="f16", choices=("f16", "f32"))
    ap.add_argument("--llama-threads", type=int, default=None, help="default: pruneviz.threads.llama_threads()")
    args = ap.parse_args()
    if not llama_cpp_available():
        print("gguf_alignment: llama.cpp is not installed (make install): nothing measured or written")
        return
    n_llama = args.llama_threads or threads.llama_threads()  # the idle cores before loading; one count for all
    pol = threads.policy()
    lm = load_bundled(device="cpu", dtype="float32")
    base, tok = lm.model.eval(), lm.tokenizer
    widths = [int(w) for w in args.widths.split(",")]
    protocol = SpeedProtocol(args.prompt, args.decode, (1,), 1, args.repeats)
    ids = prompt_ids(tok, protocol.prompt_tokens)
    labels = {"dense": None, **{f"width {w}": w for w in widths}}
    params, sizes = {}, {}
    with tempfile.TemporaryDirectory(prefix="pruneviz-align-") as td:
        paths = {}
        for label, w in labels.items():
            plan = None if w is None else width_plan(base, w)
            model = base if plan is None else apply_plan(base, plan).eval()
            paths[label] = Path(td) / f"{label.replace(' ', '_')}.gguf"
            rep = write_gguf(model, tok, paths[label], args.weight_type, plan=plan)
            params[label], sizes[label] = dense_params(model), rep.bytes
            del model
        summ = compare_ggufs(paths, ids, protocol, threads=n_llama,
                             progress=lambda f, t: print(f"  {f:4.0%} {t}", flush=True))
    dense = summ["dense"]
    rows = []
    for label, w in labels.items():
        s, r = summ[label], ratios(summ[label], dense)
        lo, hi = ratio_spread(s, dense, 1, "prefill")
        rows.append([label, "1536" if w is None else str(w), alignment(w or 1536), f"{params[label] / 1e6:.2f}M",
                     f"{sizes[label] / 2**20:.1f}", f"{s.prefill_tps[1]:,.1f}", f"{r['prefill'][1]:.2f}x",
                     f"{lo:.2f}-{hi:.2f}x", f"{s.decode_tps[1]:,.1f}", f"{r['decode'][1]:.2f}x",
                     f"{sizes['dense'] / sizes[label]:.2f}x"])
    columns = ["model", "MLP width", "multiple of", "params", "size MB", "prefill tok/s", "prefill ×dense",
               "prefill rounds' range", "decode tok/s", "decode ×dense", "bytes bound"]
    proto = [
        f"Model: SmolLM2-135M-Instruct (bundled), GGUF {args.weight_type} in llama.cpp; every layer keeps its first "
        f"w MLP channels (same width in every layer: the `llama` architecture), attention and blocks untouched.",
        f"Timing: {protocol.describe()}, interleaved in one run with the dense file (pruneviz.speed.compare_ggufs), "
        f"ratios paired by round; llama.cpp n_threads = n_threads_batch = {n_llama} for every file (threading "
        f"policy before the script loaded the model: {threads.describe(pol)}).",
        "Why: llama.cpp's CPU prompt-processing kernel (tinyBLAS in ggml-cpu/llamafile/sgemm.cpp) takes a product "
        "only if the weight has a multiple of 4 rows and a row length that is a multiple of its vector width (8 "
        "with AVX2, 16 with AVX-512); an MLP width is the row count of ffn_gate/ffn_up and the row length of "
        "ffn_down (so a width that is a multiple of 4 but not of 8 still takes it for gate and up on AVX2). "
        f"pruneviz flags widths that are not multiples of {KERNEL_MULTIPLE} (every x86 vector width) "
        "(pruneviz.gguf_export.slow_kernel_layers) on the Export page and in the CLI. Decode (one token) uses "
        "the vector dot product, where the width matters little; \"bytes bound\" is the dense size / the file "
        "size.",
    ]
    write_table("gguf_alignment", "MLP width alignment and llama.cpp speed (bundled model, CPU)", proto, columns,
                rows, extra={"llama_threads": n_llama, "protocol_fields": protocol.to_dict(),
                             "samples": {k: v.to_dict() for k, v in summ.items()}})


if __name__ == "__main__":
    main()
