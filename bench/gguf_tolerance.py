"""How closely llama.cpp reproduces a GGUF export, per weight type: the figures behind ``gguf_export.TOLERANCE``.

For the bundled SmolLM2-135M dense and pruned (20% of non-embedding parameters, magnitude and uniform: a damaged
model; and the first channels kept: an arbitrary one), each weight type is written with ``write_gguf`` and
compared with :func:`pruneviz.gguf_export.verify_gguf` (12 greedy tokens teacher-forced after a fixed prompt; max
|Δ log p| over the reference's top 10 tokens at every position, mean KL(reference || llama.cpp), greedy agreement),
under the check's settings (f32 KV cache, no flash attention) and under llama.cpp's defaults (f16 KV cache,
automatic flash attention), against the model whose weights went through the same rounding.

    .venv/bin/python bench/gguf_tolerance.py          # about 3 min on 2 cores

Writes ``bench/results/gguf_tolerance.md`` and ``.json``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import load_bundled, write_table

from pruneviz import gguf_export as G
from pruneviz.allocate import Target, allocate
from pruneviz.importance import compute
from pruneviz.llamacpp import describe
from pruneviz.plan import Plan
from pruneviz.surgery import apply_plan


def models(loaded):
    dense = loaded.model
    plan = allocate(dense, compute(dense, "magnitude"), Target(0.2, "non_embedding"), strategy="uniform")
    first = Plan.empty(dense)
    n_ff = dense.config.intermediate_size
    for layer in range(dense.config.num_hidden_layers):
        first = first.with_units("channel", layer, range(1120, n_ff))
    return {"dense": (dense, "nothing removed"),
            "magnitude 20%": (apply_plan(dense, plan), plan.summary()),
            "first 1120 channels kept": (apply_plan(dense, first), first.summary())}


def main() -> None:
    loaded = load_bundled(device="cpu", dtype="fp32")
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for label, (model, summary) in models(loaded).items():
            for wt in G.WEIGHT_TYPES:
                path = Path(td) / f"{label.split()[0]}-{wt}.gguf"
                G.write_gguf(model, loaded.tokenizer, path, wt)
                for defaults in (False, True):
                    v = G.verify_gguf(path, model, loaded.tokenizer, wt, runtime="llama.cpp",
                                      runtime_defaults=defaults)
                    rows.append([label, wt, "llama.cpp defaults" if defaults else "check (f32 KV, no FA)",
                                 f"{v['max_abs_dlogprob_topk']:.3g}", f"{v['kl_mean']:.3g}",
                                 f"{v['greedy_agreed']}/{v['greedy_total']}",
                                 "yes" if v["ok"] else "no"])
                    print(rows[-1], flush=True)
                path.unlink()
    proto = [f"Model: SmolLM2-135M-Instruct (bundled), fp32 in PyTorch; llama.cpp through {describe()}.",
             "Reference: the same model with the export's weight rounding (f16, or quantise-dequantise with the gguf "
             "package), fp32 on the CPU. Prompt: gguf_export.PROMPT, then its 12 greedy tokens teacher-forced.",
             "max |Δ log p|: over the reference's top 10 next tokens at every position; KL: mean over positions of "
             "KL(reference || llama.cpp); greedy: llama.cpp's argmax equals the reference's greedy token.",
             "Settings: 'check' = how verify_gguf runs llama.cpp (f32 KV cache, flash attention off); 'llama.cpp "
             "defaults' = f16 KV cache, automatic flash attention (what a server runs).",
             f"ok: the export's verification rule (f32/f16: greedy and max |Δ log p| within {G.TOLERANCE}; q8_0/"
             f"q4_0: the file reads back exactly and the mean KL stays under {G.QUANT_KL_SANITY}).",
             "Plans: magnitude 20% = magnitude scores, uniform allocation, 20% of non-embedding parameters (MLP "
             "channels only after rounding down); first 1120 channels kept = an arbitrary MLP cut to a width that "
             "q8_0/q4_0 blocks divide."]
    write_table("gguf_tolerance", "GGUF exports in llama.cpp vs the in-memory model, per weight type", proto,
                ["model", "weights", "llama.cpp settings", "max |Δ log p| top 10", "mean KL", "greedy", "ok"],
                rows)


if __name__ == "__main__":
    main()
