"""Defaults that generalise (issue 9): one meaning of a target, FLAP ranked once, SlimGPT's update strength,
SlimLLM's criterion and affine compensation, and self-generated calibration."""
import dataclasses

import pytest
import torch

from pruneviz.allocate import Target, allocate, resolved_normalize
from pruneviz.arch import adapter_for, geometry_of, get_path
from pruneviz.criteria import slimgpt as sg
from pruneviz.criteria.slimllm import FitSums, PairSums
from pruneviz.importance import Calibration, compute
from pruneviz.plan import Plan, dense_params
from pruneviz.selfcal import SelfGenOptions, generate_windows, sample_windows, self_generated, start_token, window_nll
from pruneviz.surgery import apply_plan, masked_model
from pruneviz.testing import tiny_model, tiny_tokenizer

CALIB = Calibration(torch.randint(4, 90, (8, 24), generator=torch.Generator().manual_seed(0)), "random")


def logits(model, ids=CALIB.tokens):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# ---- one meaning of a target ------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, options", [("uniform", {}), ("global", {}), ("uniform", {"attn_unit": "head"}),
                                               ("depth", {})])
@pytest.mark.parametrize("ratio", [0.13, 0.2, 0.31])
def test_allocation_lands_at_or_under_the_target(llama, strategy, options, ratio):
    imap = compute(llama, "magnitude")
    target = Target(ratio)
    plan = allocate(llama, imap, target, strategy=strategy, **options)
    built = apply_plan(llama, plan)
    assert dense_params(built, True) <= dense_params(llama, True) - target.budget(llama)
    assert dense_params(built) == plan.param_count(llama)


@pytest.mark.parametrize("compensation", ["flap_bias", "affine", "affine_sequential", "affine_local"])
def test_bias_compensations_count_their_biases_and_still_land(llama, compensation):
    imap = compute(llama, "flap", CALIB)
    plan = allocate(llama, imap, 0.2, strategy="global", compensation=compensation)
    built = apply_plan(llama, plan, calibration=CALIB.tokens)
    assert plan.compensation == compensation
    assert dense_params(built) == plan.param_count(llama)  # the created biases are counted
    assert dense_params(built, True) <= 0.8 * dense_params(llama, True)
    no_bias = dataclasses.replace(plan, compensation=None)
    assert plan.param_count(llama) > no_bias.param_count(llama)


@pytest.mark.parametrize("unit", ["kv", "head"])
def test_slimgpt_takes_the_same_parameter_target(llama, unit):
    target = Target(0.2)
    plan, pruned = sg.slimgpt_prune_to(llama, CALIB, target, attn_unit=unit)
    dense = dense_params(llama, True)
    removed = dense - dense_params(pruned, True)
    assert removed >= target.budget(llama)  # at or under the stated size
    ratio = sg.layer_ratio_for(llama, target, attn_unit=unit)
    smaller = sg.planned_removal(llama, ratio * 0.97, attn_unit=unit)
    assert dense - smaller.param_count(llama, True) < target.budget(llama) or ratio < 1e-6  # and just so
    assert plan.provenance["target"] == target.to_dict()


def test_slimgpt_solver_task_rounds_half_up_like_allocation(llama):
    g = Plan.empty(llama).geometry  # 40 channels: r = 0.0625 asks for 2.5 channels
    assert sg.solver_task(g, 2.5 / g.n_channels, "kv").channels == 3  # Python's round() would give 2


# ---- FLAP ranked once ----------------------------------------------------------------------------------------------

def test_flap_scores_are_not_standardised_twice(llama):
    flap = compute(llama, "flap", CALIB)
    assert flap.extras["standardized"] and resolved_normalize(flap, "auto") == "none"
    assert resolved_normalize(compute(llama, "wanda_sp", CALIB), "auto") == "layer"
    auto = allocate(llama, flap, 0.2, strategy="global")
    again = allocate(llama, flap, 0.2, strategy="global", normalize="none")
    twice = allocate(llama, flap, 0.2, strategy="global", normalize="layer")
    assert auto.counts() == again.counts() and auto.provenance["options"]["normalize"] == "none"
    assert twice.provenance["options"]["normalize"] == "layer"


# ---- SlimGPT's update strength -------------------------------------------------------------------------------------

def test_slimgpt_update_scale_zero_is_selection_without_compensation(llama):
    plan, pruned = sg.slimgpt_prune(llama, CALIB, 0.3, schedule="uniform", update_scale=0.0)
    plain = masked_model(llama, dataclasses.replace(plan, compensation=None))
    assert torch.allclose(logits(pruned), logits(plain), atol=1e-5)
    _, full = sg.slimgpt_prune(llama, CALIB, 0.3, schedule="uniform")
    _, half = sg.slimgpt_prune(llama, CALIB, 0.3, schedule="uniform", update_scale=0.5)
    dense = logits(llama)
    err = {k: (logits(m) - dense).pow(2).mean() for k, m in (("0", pruned), ("0.5", half), ("1", full))}
    assert err["1"] < err["0"] and not torch.allclose(logits(half), logits(full), atol=1e-5)
    assert plan.provenance["slimgpt_options"]["update_scale"] == 0.0


def test_slimgpt_update_scale_is_checked(llama):
    from pruneviz.errors import CriterionError

    with pytest.raises(CriterionError, match="update_scale"):
        sg.slimgpt_prune(llama, CALIB, 0.3, update_scale=1.5)


# ---- SlimLLM -------------------------------------------------------------------------------------------------------

def test_pair_sums_correlation_matches_torch():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, 3, 4, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g,
                                                                                 dtype=torch.float64)
    a[:, 0] = 2 * b + 1  # perfectly correlated
    s = PairSums()
    s.add(a[:20], b[:20])
    s.add(a[20:], b[20:])
    want = torch.stack([torch.stack([torch.corrcoef(torch.stack([a[:, k, d], b[:, d]]))[0, 1] for d in range(4)])
                        for k in range(3)])
    assert torch.allclose(s.corr(), want, atol=1e-9) and torch.allclose(s.corr()[0], torch.ones(4, dtype=torch.float64))


def test_slimllm_scores_a_silent_head_as_free_to_remove(llama):
    from pruneviz.arch import adapter_for, get_path

    model = tiny_model("llama")
    g = Plan.empty(model).geometry
    with torch.no_grad():  # head 1 of layer 0 writes nothing: removing it leaves the output unchanged
        get_path(adapter_for(model).layers(model)[0], "self_attn.o_proj").weight[:, g.head_dim:2 * g.head_dim] = 0
    imap = compute(model, "slimllm", CALIB)
    assert imap.heads[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert bool((imap.heads[0, [0, 2, 3]] > 1e-3).all()) and imap.kv.shape == (g.n_layers, g.n_kv)
    assert imap.channels.shape == (g.n_layers, g.n_channels) and bool((imap.channels >= -1e-6).all())


def test_fit_sums_recover_an_exact_affine_map():
    z = torch.randn(100, 5, dtype=torch.float64)
    a, b = torch.tensor([1.5, 0.5, 2.0, 1.0, -1.0]), torch.tensor([0.1, -2.0, 0.0, 3.0, 1.0])
    s = FitSums()
    s.add(z, z * a + b)
    fa, fb = s.fit()
    assert torch.allclose(fa.float(), a, atol=1e-6) and torch.allclose(fb.float(), b, atol=1e-6)
    ra, _ = s.fit(shrink=1e6)  # an overwhelming ridge keeps a at 1: FLAP's bias compensation
    assert torch.allclose(ra.float(), torch.ones(5), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_affine_compensation_beats_plain_removal_on_calibration(family):
    model = tiny_model(family)
    plan = allocate(model, compute(model, "wanda_sp", CALIB), 0.3, compensation="affine")
    built = apply_plan(model, plan, calibration=CALIB.tokens)
    plain = masked_model(model, dataclasses.replace(plan, compensation=None))
    dense = logits(model)
    assert (logits(built) - dense).pow(2).mean() < (logits(plain) - dense).pow(2).mean()
    assert dense_params(built) == plan.param_count(model)


def _site_io(model, site: str) -> dict:
    """Per layer: the input and output (bias included) of each block's ``site`` projection on CALIB."""
    adapter, seen, handles = adapter_for(model), {}, []
    for l, layer in enumerate(adapter.layers(model)):
        def hook(module, args, out, l=l):
            seen[l] = (args[0].reshape(-1, args[0].shape[-1]).double(), out.reshape(-1, out.shape[-1]).double())
        handles.append(get_path(layer, getattr(adapter, site)).register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=CALIB.tokens, use_cache=False)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_sequential_affine_fits_the_dense_outputs_on_the_pruned_activations(family):
    """After ``affine_sequential`` every refitted projection of the *built* model (whose inputs are the pruned
    model's activations, upstream refits included) is the least-squares affine fit of the dense model's output
    on those inputs: the residual has zero mean and is orthogonal to the fitted output, per dimension. The
    one-pass ``affine`` (fitted on dense activations) does not satisfy this beyond the first pruned layer."""
    model = tiny_model(family)
    plan = allocate(model, compute(model, "wanda_sp", CALIB), 0.3, attn_share=0.0)
    dense = _site_io(model, "mlp_out")
    for comp, exact in (("affine_sequential", True), ("affine", False)):
        built = apply_plan(model, dataclasses.replace(plan, compensation=comp), calibration=CALIB.tokens)
        worst = 0.0
        for l, (_, out) in _site_io(built, "mlp_out").items():  # out = a·z + b + the original bias
            y = dense[l][1]  # the dense output, the same original bias included
            r, centred = y - out, out - out.mean(0)
            worst = max(worst, float((r.mean(0).abs() / y.std(0)).max()),
                        float(((r * centred).mean(0).abs() / (y.std(0) * centred.std(0))).max()))
        assert (worst < 1e-4) == exact, (comp, worst)


def test_sequential_affine_equals_the_one_pass_fit_when_only_the_first_layer_loses_units(llama):
    """Only layer 0 pruned (MLP channels): its MLP sees dense inputs either way, so all three fits agree."""
    plan = Plan.empty(llama).with_units("channel", 0, range(0, 40, 3))
    built = {c: apply_plan(llama, dataclasses.replace(plan, compensation=c), calibration=CALIB.tokens)
             for c in ("affine", "affine_sequential", "affine_local")}
    ref = logits(built["affine"])
    for c in ("affine_sequential", "affine_local"):
        assert torch.allclose(logits(built[c]), ref, atol=1e-5), c


def test_sequential_affine_refuses_an_unknown_target(llama):
    from pruneviz.criteria.slimllm import affine_sequential

    with pytest.raises(ValueError, match="'dense' or 'local'"):
        affine_sequential(llama, Plan.empty(llama), CALIB.tokens, target="both")


def _correlated_inputs(n: int = 400, c: int = 12, seed: int = 0) -> torch.Tensor:
    """[n, c] fp64 inputs whose columns are correlated (a random mixing of independent ones, plus an offset)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, generator=gen, dtype=torch.float64)
    return base @ torch.randn(c, c, generator=gen, dtype=torch.float64) + 3.0


def test_ridge_reconstruction_is_the_centred_least_squares_update_and_shrinks_to_none():
    from pruneviz.criteria.slimllm import InputMoments, ridge_reconstruction

    x, w = _correlated_inputs(), torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep, gone = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11]), torch.tensor([1, 4, 7, 10])
    moments = InputMoments()
    for part in x.split(150):  # accumulated over batches, as over calibration windows
        moments.add(part)
    cov = moments.covariance()
    xc = x - x.mean(0)
    assert torch.allclose(cov, xc.T @ xc / x.shape[0], atol=1e-9)
    target = xc[:, gone] @ w[:, gone].T  # [n, D]: the removed columns' centred output
    ls = torch.linalg.lstsq(xc[:, keep], target).solution.T  # [D, K]
    assert torch.allclose(ridge_reconstruction(w, cov, keep, 0.0), ls, atol=1e-8)
    norms = [float(ridge_reconstruction(w, cov, keep, lam).norm()) for lam in (0.0, 0.1, 1.0, 10.0, 1e9)]
    assert all(a > b for a, b in zip(norms, norms[1:])) and norms[-1] < 1e-6 * norms[0]
    with pytest.raises(ValueError, match=">= 0"):
        ridge_reconstruction(w, cov, keep, -1.0)


def test_affine_fit_from_input_moments_equals_the_fit_over_the_tokens():
    """The ridge refit's one pass: the affine fit's sums for ``z = v x`` against the original output ``w x`` or
    given targets, derived from the input moments, equal the sums over the tokens themselves (fp32 products)."""
    from pruneviz.criteria.slimllm import InputMoments

    gen = torch.Generator().manual_seed(2)
    x = _correlated_inputs(c=12, seed=3).float()  # [400, 12]
    w, v = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    v[:, [1, 4, 7]] = 0  # removed columns
    targets = x @ torch.randn(12, 5, generator=gen) + torch.randn(400, 5, generator=gen)
    own, given, over_tokens, to_targets = InputMoments(), InputMoments(), FitSums(), FitSums()
    for part, t in zip(x.split(150), targets.split(150)):
        own.add(part)
        given.add(part, t)
        over_tokens.add(part @ v.T, part @ w.T)
        to_targets.add(part @ v.T, t)
    for derived, direct in ((own.fit_sums(v, w), over_tokens), (given.fit_sums(v), to_targets)):
        assert derived.n == direct.n == 400
        for field in ("sz", "sy", "szz", "szy"):
            assert torch.allclose(getattr(derived, field), getattr(direct, field), rtol=1e-5, atol=1e-3), field
        for a, b in zip(derived.fit(), direct.fit()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _site_error(model, reference, layer: int) -> float:
    """Squared error of layer ``layer``'s MLP output projection against ``reference``'s on CALIB."""
    return float((_site_io(model, "mlp_out")[layer][1] - _site_io(reference, "mlp_out")[layer][1]).pow(2).sum())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ridge_reconstruction_before_the_local_refit_fits_a_dense_input_layer_at_least_as_well(family):
    """Layer 0 (dense inputs) loses MLP channels: its kept columns plus the unregularised reconstruction span every
    per-dimension affine map, so the refitted output is at least as close to the dense one as the affine refit
    alone; a large ridge gives the affine refit back; a plan asking the one-pass ``affine`` for it is refused."""
    from pruneviz.errors import PlanError

    model = tiny_model(family)
    plan = Plan.empty(model).with_units("channel", 0, range(0, geometry_of(model).n_channels, 3))
    local = dataclasses.replace(plan, compensation="affine_local")
    built = {r: apply_plan(model, local.with_provenance(affine_ridge=r) if r is not None else local,
                           calibration=CALIB.tokens) for r in (None, 0.0, 1e9)}
    errors = {r: _site_error(m, model, 0) for r, m in built.items()}
    assert errors[0.0] < 0.9 * errors[None], errors
    assert errors[1e9] == pytest.approx(errors[None], rel=1e-4)
    assert dense_params(built[0.0]) == local.param_count(model)
    with pytest.raises(PlanError, match="one-pass affine"):
        apply_plan(model, dataclasses.replace(plan, compensation="affine").with_provenance(affine_ridge=1.0),
                   calibration=CALIB.tokens)


def test_recipe_with_the_ridge_reconstruction(llama):
    """``Recipe(ridge=...)`` reaches the channel choice and the build through the plan; bad values are refused."""
    from pruneviz.recipe import RECOMMENDED, Recipe, run_recipe

    base = dataclasses.replace(RECOMMENDED, ridge=None)
    plain = run_recipe(llama, tiny_tokenizer(), Target(0.2), base, calibration=CALIB)
    ridged = run_recipe(llama, tiny_tokenizer(), Target(0.2), dataclasses.replace(base, ridge=0.5),
                        calibration=CALIB)
    assert ridged.plan.provenance["affine_ridge"] == 0.5 and "affine_ridge" not in plain.plan.provenance
    assert "ridge reconstruction (lambda 0.5)" in ridged.recipe.describe()
    assert dense_params(ridged.model) == ridged.plan.param_count(llama) <= 0.8 * dense_params(llama, True) + (
        dense_params(llama) - dense_params(llama, True))
    assert not torch.allclose(logits(ridged.model), logits(plain.model))
    rebuilt = apply_plan(llama, ridged.plan, calibration=CALIB.tokens)  # the plan alone rebuilds the same model
    assert torch.equal(logits(rebuilt), logits(ridged.model))
    with pytest.raises(ValueError, match="ridge"):
        Recipe(ridge=-1.0)
    with pytest.raises(ValueError, match="ridge"):
        Recipe(ridge=1.0, compensation="affine", channel_order="dense")


# ---- self-generated calibration ------------------------------------------------------------------------------------

def test_self_generated_calibration_is_seeded_filtered_and_cached(tmp_path, monkeypatch):
    import pruneviz.selfcal

    monkeypatch.setattr(pruneviz.selfcal, "cache_dir", lambda: tmp_path)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    opts = SelfGenOptions(n_samples=4, seq_len=12, oversample=2.0, batch_size=4)
    rng = torch.get_rng_state()
    calib = self_generated(model, tok, opts)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert calib.tokens.shape == (4, 12) and "self-generated" in calib.text_name
    files = list((tmp_path / "selfcal").glob("*.json"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o044  # readable like any file the user writes
    assert torch.equal(self_generated(model, tok, opts).tokens, calib.tokens)  # from the cache
    assert torch.equal(generate_windows(model, tok, opts), calib.tokens)  # and the same without it
    other = self_generated(model, tok, dataclasses.replace(opts, seed=1))
    assert not torch.equal(other.tokens, calib.tokens) and len(list((tmp_path / "selfcal").glob("*.json"))) == 2


def test_self_generated_keeps_the_lowest_perplexity_windows(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    opts = SelfGenOptions(n_samples=3, seq_len=10, oversample=2.0, batch_size=6)
    start = start_token(tok)
    every = sample_windows(model, start, opts, None, None)
    nll = window_nll(model, every, start, 6)
    kept = generate_windows(model, tok, opts)
    kept_nll = window_nll(model, kept, start, 6)
    assert every.shape == (6, 10) and kept.shape == (3, 10)
    assert float(kept_nll.max()) <= float(nll.sort().values[2]) + 1e-6


def test_self_generated_calibration_stops_within_a_decoding_step():
    """Bug 8: a cancel (e.g. the page that started the job was reloaded) stops ``generate`` at the next token, not
    after the whole batch of windows."""
    from pruneviz.progress import Cancelled

    model, tok = tiny_model("llama"), tiny_tokenizer()
    opts = SelfGenOptions(n_samples=2, seq_len=40, oversample=1.0, batch_size=2)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3  # the loop's own check, then two decoding steps, then stop

    with pytest.raises(Cancelled):
        sample_windows(model, start_token(tok), opts, None, cancel)
    assert 3 < len(calls) < 10  # asked during decoding, and not once per token to the end (41)


def test_self_generated_options_are_checked():
    from pruneviz.errors import TextError

    with pytest.raises(TextError, match="oversample"):
        SelfGenOptions(oversample=0.5)


# ---- the recipe and the CLI ----------------------------------------------------------------------------------------

def test_recipe_prunes_to_the_target_and_records_itself(tmp_path, monkeypatch):
    from pruneviz.recipe import RECOMMENDED, run_recipe

    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    recipe = dataclasses.replace(RECOMMENDED, samples=6, seq_len=16)
    seen = []
    result = run_recipe(model, tok, Target(0.2), recipe, progress=lambda f, m: seen.append(f))
    assert dense_params(result.model, True) <= 0.8 * dense_params(model, True)
    assert dense_params(result.model) == result.plan.param_count(model)
    assert result.plan.compensation == "affine_local" and result.plan.counts()["kv"] == 0  # MLP channels only
    assert result.plan.provenance["channel_order"] == "sequential" and result.plan.provenance["affine_ridge"] == 1.0
    assert result.plan.provenance["recipe"]["calibration"] == "self" and seen[-1] == 1.0
    assert "self-generated" in result.calibration.text_name


def test_recipe_with_given_windows_and_the_official_channel_order(llama):
    """``run_recipe(..., calibration=)`` uses those windows; ``channel_order="sequential"`` re-chooses the channels
    block by block with the local refit and still lands at the target; inconsistent recipes are refused."""
    from pruneviz.recipe import RECOMMENDED, Recipe, run_recipe

    recipe = dataclasses.replace(RECOMMENDED, compensation="affine_local", channel_order="sequential")
    result = run_recipe(llama, tiny_tokenizer(), Target(0.2), recipe, calibration=CALIB)
    assert result.calibration is CALIB and result.plan.provenance["channel_order"] == "sequential"
    assert result.plan.compensation == "affine_local" and "block by block" in recipe.describe()
    assert dense_params(result.model, True) <= 0.8 * dense_params(llama, True)
    assert dense_params(result.model) == result.plan.param_count(llama)
    with pytest.raises(ValueError, match="needs criterion='slimllm' and compensation='affine_local'"):
        Recipe(compensation="affine", channel_order="sequential")
    with pytest.raises(ValueError, match="channel_order must be one of"):
        Recipe(channel_order="random")


def test_recipe_spreads_the_cosine_ratios_over_every_layer(llama):
    """The recipe's ``criterion_options`` reach the map and the allocation: with ``pruned_layers=1`` every layer
    loses channels; with the official share (26/32: 3 of the tiny model's 4 layers) one layer keeps all."""
    from pruneviz.recipe import RECOMMENDED, run_recipe

    def widths(recipe):
        result = run_recipe(llama, tiny_tokenizer(), Target(0.2), recipe, calibration=CALIB)
        return [layer.mlp.down_proj.in_features for layer in result.model.model.layers]

    full = llama.config.intermediate_size
    assert dict(RECOMMENDED.criterion_options)["pruned_layers"] == 1.0
    assert all(w < full for w in widths(RECOMMENDED))
    official = dataclasses.replace(RECOMMENDED, criterion_options=(("pruned_layers", 26 / 32),))
    assert any(w == full for w in widths(official))


def test_recipe_with_aligned_widths(llama):
    """``alloc`` with ``multiple_of``: the re-chosen channels keep the allocation's aligned counts (every pruned
    layer's MLP width a multiple of 8) and the model lands at the target; a bad option is refused at once."""
    from pruneviz.errors import PlanError
    from pruneviz.recipe import RECOMMENDED, Recipe, run_recipe

    recipe = dataclasses.replace(RECOMMENDED, alloc=(*RECOMMENDED.alloc, ("multiple_of", 8)))
    result = run_recipe(llama, tiny_tokenizer(), Target(0.2), recipe, calibration=CALIB)
    widths = [layer.mlp.down_proj.in_features for layer in result.model.model.layers]
    assert all(w % 8 == 0 for w in widths) and min(widths) < 40, widths
    assert dense_params(result.model, True) <= 0.8 * dense_params(llama, True)
    with pytest.raises(PlanError, match="multiple_of is a whole number"):
        Recipe(alloc=(("multiple_of", 0),))


@pytest.fixture
def folder(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_cli_prune_exports_the_recipe_at_the_stated_size(folder, tmp_path, monkeypatch, capsys):
    from pruneviz.cli import main
    from pruneviz.loading import load_model

    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path / "cache"))
    dense = dense_params(load_model(str(folder)).model)
    want = dense - 6000
    code = main(["prune", "--model", str(folder), "--params", str(want), "--calibration", "text", "--text",
                 "file:" + str(_text(tmp_path)), "--out", str(tmp_path / "out")])
    assert code == 0
    pruned = load_model(str(tmp_path / "out"))
    assert dense_params(pruned.model) <= want
    assert "recipe:" in capsys.readouterr().out
    assert main(["prune", "--model", str(folder), "--params", "12M", "--out", str(tmp_path / "o2")]) == 2
    assert "below the dense model" in capsys.readouterr().err
    assert main(["prune", "--model", str(folder), "--params", str(want), "--channel-order", "sequential",
                 "--compensation", "affine", "--out", str(tmp_path / "o3")]) == 2
    assert "with --channel-order sequential pass --compensation affine_local" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
    assert main(["prune", "--model", str(folder), "--params", str(want), "--compensation", "nope", "--out",
                 str(tmp_path / "o4")]) == 2
    assert "unknown --compensation 'nope'" in capsys.readouterr().err


def _text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


def test_cli_slimgpt_ratio_means_a_share_of_parameters(folder, tmp_path, capsys):
    from pruneviz.cli import main
    from pruneviz.export import read_plan
    from pruneviz.loading import load_model

    model = load_model(str(folder)).model
    code = main(["slimgpt", "--model", str(folder), "--ratio", "0.2", "--text", "file:" + str(_text(tmp_path)),
                 "--samples", "4", "--seq-len", "16", "--out", str(tmp_path / "plan.json")])
    assert code == 0
    plan = read_plan(tmp_path / "plan.json")
    assert dense_params(model, True) - plan.param_count(model, True) >= 0.2 * dense_params(model, True)
    assert plan.provenance["target"] == {"ratio": 0.2, "of": "non_embedding"}


@pytest.mark.parametrize("cal, ev, same", [
    ("default (pydoc topics, calibration part)", "default", True), ("default", "pydoc held-out", True),
    ("self-generated by x (32 x 128 ...)", "default", False), ("file:a.txt", "file:a.txt", True),
    ("default", "file:ptb.txt", False), (None, "default", False)])
def test_every_perplexity_can_say_whether_it_shares_the_calibration_domain(cal, ev, same):
    from pruneviz.data import domain_note

    note, is_same = domain_note(cal, ev)
    assert is_same is same and ev in note


# ---- MINI-LLM with feature-map gates -------------------------------------------------------------------------------

def test_minillm_gates_estimate_the_backprop_gate_gradients(llama):
    from scipy.stats import spearmanr

    from pruneviz.criteria.minillm import exact_gate_gradients, gate_estimate

    calib = CALIB.tokens[:4, :16]
    exact = exact_gate_gradients(llama, calib, "head", batch_size=4)  # [L, H]
    zo = gate_estimate(llama, calib, "head", queries=128, epsilon=1e-3, seed=0, batch_size=4)
    few = gate_estimate(llama, calib, "head", queries=2, epsilon=1e-3, seed=0, batch_size=4)
    rho = spearmanr(zo.flatten().numpy(), exact.flatten().numpy()).statistic
    rho_few = spearmanr(few.flatten().numpy(), exact.flatten().numpy()).statistic
    assert rho > 0.8 and rho > rho_few  # 24 gates: a few hundred queries are plenty
    assert torch.equal(gate_estimate(llama, calib, "head", 2, 1e-3, 0, 4), few)  # seeded


def test_minillm_gates_reading_scores_and_leaves_the_model_alone(llama):
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    from pruneviz.importance import make_options

    options = make_options("minillm", queries=8, variables="gates")
    imap = compute(llama, "minillm", Calibration(CALIB.tokens[:4, :16]), options)
    g = imap.geometry
    assert imap.heads.shape == (g.n_layers, g.n_heads) and imap.channels.shape == (g.n_layers, g.n_channels)
    assert bool((imap.kv >= 0).all()) and imap.extras["variables"] == "gates"
    assert all(torch.equal(v, llama.state_dict()[k]) for k, v in state.items())
    assert not any(m._forward_pre_hooks for m in llama.modules())


def test_sweep_points_gain_kl_to_the_dense_model(llama):
    from pruneviz.evaluate import PPLProtocol, sweep
    from pruneviz.fidelity import fidelity, with_fidelity
    from pruneviz.surgery import masked_model

    tok = tiny_tokenizer()
    text = "the quick brown fox jumps over the lazy dog. " * 30
    proto = PPLProtocol("t", 32, 32, "once", 4, 2)
    imap = compute(llama, "magnitude")
    points = sweep(llama, tok, {"magnitude": imap}, [0.1, 0.3], "channels", text, proto)
    measured = with_fidelity(llama, tok, points, text, proto)
    dense, rest = measured[0], measured[1:]
    assert dense.criterion == "dense" and dense.kl_mean == 0.0 and dense.top1 == 1.0
    assert rest[0].kl_mean < rest[1].kl_mean  # more removed, further from the dense model
    direct = fidelity(llama, masked_model(llama, rest[1].plan), tok, text, proto)
    assert rest[1].kl_mean == pytest.approx(direct.kl_mean) and rest[1].row()["kl_mean"] == rest[1].kl_mean
    assert with_fidelity(llama, tok, points, text, proto, cancel=lambda: True)[1].kl_mean is None


@pytest.mark.parametrize("family, bos", [("gemma2", True), ("gemma3_text", True), ("llama", False)])
def test_families_that_need_bos_get_it_in_every_window_and_say_so(family, bos):
    from pruneviz.evaluate import PPLProtocol, perplexity, protocol_for

    model, tok = tiny_model(family), tiny_tokenizer()
    proto = PPLProtocol("t", 16, 16, "none", 3, 3)
    res = perplexity(model, tok, "the quick brown fox jumps over the lazy dog. " * 10, proto)
    assert (res.protocol.bos == "per_window") is bos and res.protocol.name.endswith("+bos") is bos
    assert ("BOS at the start of every window" in res.describe()) is bos
    assert protocol_for(model, PPLProtocol("t", 16, 16, "per_window")).name == "t"  # already there: unchanged


# ---- user GGUF files: de-quantised once, cached by hash ------------------------------------------------------------

def test_user_gguf_is_converted_once_per_content_and_the_cache_can_be_listed_and_cleared(tmp_path, monkeypatch,
                                                                                         capsys):
    from pruneviz import loading
    from pruneviz.cli import main

    monkeypatch.setenv("PRUNEVIZ_CACHE", str(tmp_path / "cache"))
    calls = []

    def tiny_convert(gguf, progress=None):  # the real conversion is the bundled model's (tested with it)
        calls.append(gguf)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(loading, "_clean_model_from_gguf", tiny_convert)
    user = tmp_path / "my-model.gguf"
    user.write_bytes(b"GGUF" + b"\0" * 100)
    seen = []
    first = loading.load_model(str(user), progress=lambda f, m: seen.append(f))
    again = loading.load_model(str(user))
    assert len(calls) == 1 and first.path == user.resolve() and again.model.config._name_or_path == str(user.resolve())
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    user.write_bytes(b"GGUF" + b"\1" * 100)  # new content, same name: converted again
    loading.load_model(str(user))
    assert len(calls) == 2 and len(loading.cached_ggufs()) == 2
    assert main(["cache", "list"]) == 0 and "my-model" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and loading.cached_ggufs() == []
    assert "removed 2" in capsys.readouterr().out


def test_slimllm_scores_do_not_depend_on_the_memory_chunking(llama, monkeypatch):
    from pruneviz.criteria import slimllm

    whole = compute(llama, "slimllm", CALIB)
    monkeypatch.setattr(slimllm, "UNIT_CHUNK", 3)  # heads, groups and channels in several chunks
    chunked = compute(llama, "slimllm", CALIB)
    for m in ("heads", "kv", "channels"):
        assert torch.allclose(whole.get(m), chunked.get(m), atol=1e-4)


def test_cli_prune_takes_the_number_of_calibration_windows(tmp_path, capsys):
    """``prune --samples N`` runs the recipe on N self-generated windows; 0 is refused before anything is written."""
    import json

    from pruneviz.cli import main

    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    common = ["prune", "--model", str(folder), "--device", "cpu", "--ratio", "0.2"]
    assert main([*common, "--samples", "0", "--out", str(tmp_path / "no")]) == 2
    assert "--samples" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main([*common, "--samples", "3", "--out", str(tmp_path / "out")]) == 0
    assert "(3 x 128" in capsys.readouterr().out
    plan = json.loads((tmp_path / "out" / "config.json").read_text())["pruneviz_plan"]
    assert "3 x 128" in json.dumps(plan["provenance"]) or "3/" in json.dumps(plan["provenance"])


def test_cli_prune_exports_in_the_format_asked(tmp_path, capsys):
    """``prune --format decilm`` writes the recipe's model as a DeciLM folder (vLLM), verified like ``export``."""
    import json

    from pruneviz.cli import main

    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert main(["prune", "--model", str(folder), "--device", "cpu", "--ratio", "0.2", "--samples", "2",
                 "--out", str(tmp_path / "out"), "--format", "decilm"]) == 0
    assert "decilm checkpoint ->" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "pruneviz_export.json").read_text())
    assert report["format"] == "decilm" and report["ok"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]


def test_cli_recipe_options_reach_the_recipe():
    """``prune --multiple-of/--compensation/--channel-order`` become Recipe fields; the Recipe checks them."""
    from argparse import Namespace

    from pruneviz.cli import _recipe_with
    from pruneviz.errors import PlanError
    from pruneviz.recipe import RECOMMENDED

    r = _recipe_with(RECOMMENDED, Namespace(compensation=None, channel_order=None, multiple_of=32))
    assert dict(r.alloc) == {"attn_share": 0.0, "multiple_of": 32} and r.compensation == "affine_local"
    assert r.with_alloc(multiple_of=8).alloc == (("attn_share", 0.0), ("multiple_of", 8))  # set, not appended
    r = _recipe_with(RECOMMENDED, Namespace(compensation="none", channel_order="dense", multiple_of=None))
    assert r.compensation is None and r.channel_order == "dense" and r.alloc == RECOMMENDED.alloc
    with pytest.raises(PlanError, match="--channel-order dense for another --compensation"):
        _recipe_with(RECOMMENDED, Namespace(compensation="affine", channel_order=None, multiple_of=None))
    with_ridge = dataclasses.replace(RECOMMENDED, ridge=1.0)  # whatever the default: the CLI's handling of it
    r = _recipe_with(with_ridge, Namespace(compensation="none", channel_order="dense", multiple_of=None))
    assert r.ridge is None  # another refit drops the reconstruction that belongs to the sequential ones
    r = _recipe_with(with_ridge, Namespace(compensation=None, channel_order=None, multiple_of=None, ridge="2.5"))
    assert r.ridge == 2.5
    assert _recipe_with(with_ridge, Namespace(compensation=None, channel_order=None, multiple_of=None,
                                              ridge="none")).ridge is None
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(PlanError, match="--ridge is a number >= 0"):
            _recipe_with(with_ridge, Namespace(compensation=None, channel_order=None, multiple_of=None, ridge=bad))
    with pytest.raises(PlanError, match="--ridge none with another --compensation"):
        _recipe_with(with_ridge, Namespace(compensation="none", channel_order="dense", multiple_of=None,
                                           ridge="1"))
