"""LoRA recovery: learning, input never mutated, merged plain model, cancel, determinism, pruned-model export."""
import json

import pytest
import torch

from pruneviz.arch import geometry_of
from pruneviz.errors import OutOfMemoryAdvice, PrunevizError, TextError
from pruneviz.plan import Plan
from pruneviz.recovery import LoRAOptions, batch_order, lora_targets, lr_factor, recover
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 1800 chars, very repetitive
FAST = dict(seq_len=32, batch_size=4, warmup_steps=3, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ragged_plan(model):
    g = geometry_of(model)
    p = Plan.empty(model).with_units("channel", 0, [1, 2]).with_units("block", None, [1])
    return p.with_units("kv", 2, [g.n_kv - 1]) if g.n_kv != g.n_heads else p.with_units("head", 2, [0])


# ---- pure helpers -------------------------------------------------------------------------------------------------

def test_lr_schedule_hand_values():
    opts = LoRAOptions(steps=6, warmup_steps=2)
    assert [lr_factor(s, opts) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    cos = LoRAOptions(steps=6, warmup_steps=2, schedule="cosine")
    assert [round(lr_factor(s, cos), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]
    const = LoRAOptions(steps=6, warmup_steps=0, schedule="constant")
    assert [lr_factor(s, const) for s in range(6)] == [1.0] * 6


def test_batch_order_cycles_through_shuffled_epochs():
    order = batch_order(n_windows=5, steps=4, batch_size=3, seed=1)  # 12 draws = 2 full epochs + 2
    assert order.shape == (4, 3)
    flat = order.flatten().tolist()
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert torch.equal(order, batch_order(5, 4, 3, seed=1))


def test_target_parameter_counts_by_hand(tok):
    model = tiny_model("llama")  # 4 layers, hidden 48, q/o 48x48, k/v 48->16, gate/up 48->40, down 40->48
    for target, per_layer in [(("q_proj",), 48 + 48),
                              ("projections", (48 + 48) * 2 + (48 + 16) * 2 + (48 + 40) * 3)]:
        res = recover(model, tok, TEXT, LoRAOptions(steps=1, r=8, target=target, **{**FAST, "lr": 1e-4}))
        assert res.trainable_params == 4 * 8 * per_layer
    assert len(lora_targets(model)) == 4 * 7
    every = recover(model, tok, TEXT, LoRAOptions(steps=1, target="all-linear", **FAST))
    assert every.trainable_params == 4 * 8 * ((48 + 48) * 2 + (48 + 16) * 2 + (48 + 40) * 3)  # lm_head excluded


# ---- training behaviour -------------------------------------------------------------------------------------------

def test_loss_decreases_and_eval_ppl_improves(tok):
    model = tiny_model("llama")
    seen = []
    res = recover(model, tok, TEXT, LoRAOptions(steps=30, **FAST), progress=lambda f, m: seen.append(f),
                  eval_text=TEXT)
    assert res.steps_done == 30 and len(res.losses) == 30 and not res.cancelled
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert res.eval_ppl_after < 0.85 * res.eval_ppl_before
    assert seen == sorted(seen) and seen[-1] == 1.0 and 0.0 <= seen[0]


def test_input_model_is_not_mutated(tok):
    model = tiny_model("qwen3")
    before, flags, cfg = snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()}, \
        model.config.to_dict()
    res = recover(model, tok, TEXT, LoRAOptions(steps=5, **FAST))
    assert same_state(before, snapshot(model))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.config.to_dict() == cfg and not hasattr(model.config, "pruneviz_recovery")
    assert not model.training and res.model is not model


def test_result_is_a_plain_merged_model(tiny, tok):
    base = snapshot(tiny)
    res = recover(tiny, tok, TEXT, LoRAOptions(steps=3, **FAST))
    out = res.model
    assert type(out) is type(tiny) and not out.training
    assert not [n for n, _ in out.named_modules() if "lora" in n.lower()]
    assert not [n for n in out.state_dict() if "lora_" in n] and not hasattr(out, "peft_config")
    after = snapshot(out)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in base.items()}
    changed = [k for k in base if not torch.equal(base[k], after[k])]
    assert changed and all(k.endswith("weight") for k in changed)  # LoRA targets only (bias="none")
    assert not any("embed" in k or "wte" in k or "wpe" in k or "norm" in k for k in changed)
    rec = json.loads(out.config.to_json_string())["pruneviz_recovery"]
    assert rec["steps_done"] == 3 and rec["final_loss"] == res.losses[-1] and rec["r"] == 8
    ids = torch.tensor([[1, 10, 11, 12]])
    assert out.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


def test_cancel_keeps_steps_done(tok):
    model = tiny_model("llama")
    polls = []
    res = recover(model, tok, TEXT, LoRAOptions(steps=20, **FAST),
                  cancel=lambda: polls.append(1) or len(polls) > 3)  # polled once before every step
    assert res.cancelled and res.steps_done == 3 and len(res.losses) == 3
    assert res.model.config.pruneviz_recovery["cancelled"] is True
    assert res.model(torch.tensor([[1, 5, 6, 7]])).logits.isfinite().all()
    assert not same_state(snapshot(model), snapshot(res.model))
    # steps 0-2 are warm-up (lr factor 1/3, 2/3, 1 whatever the run length) and the window pool does not depend
    # on steps, so a 20-step run cancelled after 3 equals a complete 3-step run
    short = recover(model, tok, TEXT, LoRAOptions(steps=3, **FAST))
    assert short.losses == res.losses and same_state(snapshot(short.model), snapshot(res.model))


def test_cancel_before_first_step_returns_the_input_weights(tok):
    model = tiny_model("mistral")
    res = recover(model, tok, TEXT, LoRAOptions(steps=20, **FAST), cancel=lambda: True)
    assert res.cancelled and res.steps_done == 0 and res.losses == []
    assert same_state(snapshot(model), snapshot(res.model))  # LoRA B starts at 0: merging adds exactly 0


def test_deterministic_under_seed_and_caller_rng_untouched(tok):
    model = tiny_model("opt")  # OPT has base dropout, so the seeded RNG matters
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = recover(model, tok, TEXT, LoRAOptions(steps=6, seed=7, **FAST))
    assert torch.equal(state, torch.random.get_rng_state())
    b = recover(model, tok, TEXT, LoRAOptions(steps=6, seed=7, **FAST))
    c = recover(model, tok, TEXT, LoRAOptions(steps=6, seed=8, **FAST))
    assert a.losses == b.losses and same_state(snapshot(a.model), snapshot(b.model))
    assert a.losses != c.losses


def test_gradient_checkpointing_gives_the_same_training(tok):
    model = tiny_model("llama")
    plain = recover(model, tok, TEXT, LoRAOptions(steps=4, **FAST))
    ckpt = recover(model, tok, TEXT, LoRAOptions(steps=4, gradient_checkpointing=True, **FAST))
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(ckpt.losses), atol=1e-5)
    assert not ckpt.model.is_activation_checkpointing


def test_bf16_model_keeps_dtype_and_buffers(tok):
    model = tiny_model("llama", dtype=torch.bfloat16)
    res = recover(model, tok, TEXT, LoRAOptions(steps=3, **FAST))
    assert {p.dtype for p in res.model.parameters()} == {torch.bfloat16}
    assert {k: b.dtype for k, b in model.named_buffers()} == {k: b.dtype for k, b in res.model.named_buffers()}


# ---- pruned models and export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_model_recovers_then_exports(family, tok, tmp_path):
    from pruneviz.export import load_pruned_folder, save_pruned

    base = tiny_model(family)
    plan = ragged_plan(base)
    pruned = apply_plan(base, plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    res = recover(pruned, tok, TEXT, LoRAOptions(steps=5, **FAST))
    out = res.model
    assert {k: v.shape for k, v in out.state_dict().items()} == shapes
    assert out.config.pruneviz_layout == pruned.config.pruneviz_layout
    assert out.config.pruneviz_plan == pruned.config.pruneviz_plan
    report = save_pruned(out, tok, tmp_path / "out", plan=plan)
    assert report.ok and report.format == "pruneviz" and report.reload_max_abs_diff == 0.0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["pruneviz_recovery"]["steps_done"] == 5
    ids = torch.tensor([[1, 20, 21, 22, 23]])
    assert torch.equal(load_pruned_folder(tmp_path / "out")(ids).logits, out(ids).logits)


def test_masked_preview_is_refused(tok):
    model = tiny_model("llama")
    view = masked_model(model, Plan.empty(model).with_units("channel", 0, [0]))
    with pytest.raises(PrunevizError, match="physically pruned"):
        recover(view, tok, TEXT, LoRAOptions(steps=1, **FAST))


# ---- errors -------------------------------------------------------------------------------------------------------

def test_text_errors(tok):
    model = tiny_model("llama")
    with pytest.raises(TextError):
        recover(model, tok, "   ", LoRAOptions(steps=1, **FAST))
    with pytest.raises(TextError):
        recover(model, tok, "too short", LoRAOptions(steps=1, **FAST))
    with pytest.raises(PrunevizError, match="steps"):
        recover(model, tok, TEXT, LoRAOptions(steps=0))


def test_non_finite_loss_stops_with_advice(tok):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[4:].fill_(float("nan"))
    with pytest.raises(PrunevizError, match="loss became nan"):
        recover(model, tok, TEXT, LoRAOptions(steps=2, **FAST))


def test_out_of_memory_becomes_advice(tok, monkeypatch):
    import pruneviz.recovery as rec

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rec, "_train_step", boom)
    with pytest.raises(OutOfMemoryAdvice, match="LoRA recovery"):
        recover(tiny_model("llama"), tok, TEXT, LoRAOptions(steps=2, **FAST))
