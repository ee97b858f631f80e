"""Several passes at once on ONE shared base model (what the app does: one cached model, many sessions) give the
same results as the same passes run one after the other, and leave the model as it was.

Before the fix, statistics hooks, MINI-LLM's perturbation hooks, masks and Taylor's requires_grad flags lived on the
shared model's own modules and parameters, so concurrent calls saw each other's hooks (wrong maps) or lost their
gradients (crashes).
"""
from __future__ import annotations

import threading

import pytest
import torch

from pruneviz import importance
from pruneviz.importance import Calibration
from pruneviz.plan import Plan
from pruneviz.surgery import masking
from pruneviz.testing import tiny_model

CRITERIA = {"flap": None, "wanda_sp": None, "taylor": None, "block_influence": None,
            "minillm": importance.make_options("minillm", queries=4)}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def calibs():
    """Different calibration windows per thread, so mixed-up statistics show."""
    return [Calibration(torch.randint(4, 96, (4, 24), generator=torch.Generator().manual_seed(s)), f"c{s}")
            for s in range(3)]


def run_threads(jobs):
    """Run every ``job()`` in its own thread, all released at once; returns results in order (errors re-raised)."""
    barrier, out, errors = threading.Barrier(len(jobs)), [None] * len(jobs), []

    def worker(i, job):
        try:
            barrier.wait()
            out[i] = job()
        except BaseException as e:  # noqa: BLE001 - collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


def maps_equal(a, b) -> bool:
    return all(torch.allclose(getattr(a, m), getattr(b, m), rtol=1e-5, atol=1e-7, equal_nan=True)
               for m in a.available())


def no_hooks(model) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_one_criterion_in_three_threads_equals_sequential(llama, calibs, name):
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    sequential = [importance.compute(llama, name, c, CRITERIA[name]) for c in calibs]
    concurrent = run_threads([lambda c=c: importance.compute(llama, name, c, CRITERIA[name]) for c in calibs])
    for s, c in zip(sequential, concurrent):
        assert maps_equal(s, c), name
    assert no_hooks(llama)
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert all(p.grad is None for p in llama.parameters())


def test_mixed_criteria_and_masking_at_once(llama, calibs):
    ids = calibs[0].tokens
    plan = Plan.empty(llama).with_units("channel", 1, range(10)).with_units("head", 2, [0, 3])
    with torch.no_grad():
        dense = llama(ids).logits
        with masking(llama, plan) as view:
            masked = view(ids).logits

    def masked_logits():
        with masking(llama, plan) as view, torch.no_grad():
            out = view(ids).logits
        return out

    def dense_logits():
        with torch.no_grad():
            return llama(ids).logits

    names = ["flap", "wanda_sp", "taylor", "minillm"]
    sequential = [importance.compute(llama, n, calibs[i % 3], CRITERIA[n]) for i, n in enumerate(names)]
    jobs = [lambda n=n, i=i: importance.compute(llama, n, calibs[i % 3], CRITERIA[n]) for i, n in enumerate(names)]
    results = run_threads(jobs + [masked_logits, dense_logits, masked_logits, dense_logits])
    for s, c in zip(sequential, results[:4]):
        assert maps_equal(s, c)
    assert torch.equal(results[4], masked) and torch.equal(results[6], masked)
    assert torch.equal(results[5], dense) and torch.equal(results[7], dense)
    assert no_hooks(llama)


def test_masking_never_touches_the_model(llama):
    ids = torch.randint(4, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    plan = Plan.empty(llama).with_units("block", None, [1])
    with torch.no_grad():
        ref = llama(ids).logits
        with masking(llama, plan) as view:
            assert view is not llama and no_hooks(llama)
            assert torch.equal(llama(ids).logits, ref)  # another user of the model sees the dense model
            assert not torch.equal(view(ids).logits, ref)


def test_gradient_views_share_storage_but_not_flags(llama):
    from pruneviz.offload import clone_model

    view = clone_model(llama, share_weights=True, own_parameters=True)
    base_p, view_p = next(llama.parameters()), next(view.parameters())
    assert view_p is not base_p and view_p.data_ptr() == base_p.data_ptr()
    view_p.requires_grad_(not base_p.requires_grad)
    assert view_p.requires_grad != base_p.requires_grad
