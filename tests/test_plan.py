"""Plans: normal form, JSON round trip, hashing, validation against the wrong model, property tests."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pruneviz.errors import PlanError
from pruneviz.plan import Plan
from pruneviz.testing import tiny_model

LLAMA = tiny_model("llama")  # 4 layers, 6 heads in 2 KV groups of 3, 40 channels


def test_json_round_trip_and_hash():
    p = Plan.empty(LLAMA, criterion="magnitude").with_units("channel", 1, [3, 1, 3]).with_units("block", None, [2])
    q = Plan.from_json(p.to_json())
    assert q == p and hash(q) == hash(p) and q.sha256() == p.sha256()
    assert q.removed("channel", 1) == (1, 3)
    assert q.provenance == {"criterion": "magnitude"}
    assert len({p, q}) == 1


def test_full_group_of_heads_becomes_a_kv_group():
    p = Plan.empty(LLAMA).with_units("head", 0, [3, 4, 5])
    assert p.removed("kv", 0) == (1,) and p.removed("head", 0) == ()
    assert p.removed_heads_all(0) == (3, 4, 5)
    back = p.with_units("head", 0, [4], remove=False)  # taking one head back re-opens the group
    assert back.removed("kv", 0) == () and back.removed("head", 0) == (3, 5)


def test_units_in_removed_blocks_are_dropped():
    p = Plan.empty(LLAMA).with_units("channel", 2, [0]).with_units("block", None, [2])
    assert p.removed("channel", 2) == () and p.blocks == (2,)


def test_toggle_is_an_involution():
    p = Plan.empty(LLAMA)
    for kind, layer, idx in [("head", 1, 2), ("kv", 3, 0), ("channel", 0, 39), ("block", None, 3)]:
        assert p.toggled(kind, layer, idx).toggled(kind, layer, idx) == p


def test_plan_for_another_model_is_rejected_with_reason():
    p = Plan.empty(LLAMA)
    other = tiny_model("mistral")
    with pytest.raises(PlanError, match="n_kv"):
        p.validate(other)
    reseeded = tiny_model("llama", seed=1)  # same shapes, other weights
    with pytest.raises(PlanError, match="different weights"):
        p.validate(reseeded)
    p.validate(reseeded, allow_other_weights=True)


@pytest.mark.parametrize("text,match", [
    ("{not json", "not valid JSON"),
    ('{"schema": "x"}', "not a pruneviz plan"),
    ('{"schema": "pruneviz.plan/1", "base": {}}', "malformed"),
])
def test_malformed_plans(text, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_json(text)


def test_out_of_range_indices():
    d = json.loads(Plan.empty(LLAMA).to_json())
    d["channels"] = {"0": [40]}
    with pytest.raises(PlanError, match="out of range"):
        Plan.from_dict(d).validate(LLAMA)
    d["channels"], d["blocks"] = {}, [0, 1, 2, 3]
    with pytest.raises(PlanError, match="every block"):
        Plan.from_dict(d).validate(LLAMA)


units = st.lists(st.tuples(st.sampled_from(["head", "kv", "channel", "block"]), st.integers(0, 3),
                           st.integers(0, 39)), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(units)
def test_normal_form_properties(edits):
    g = LLAMA.config
    p = Plan.empty(LLAMA)
    for kind, layer, idx in edits:
        n = {"head": 6, "kv": 2, "channel": 40, "block": 4}[kind]
        p = p.toggled(kind, None if kind == "block" else layer, idx % n)
    q = Plan.from_json(p.to_json())
    assert q == p and q.sha256() == p.sha256()
    for layer in p.kept_blocks():
        removed_groups = set(p.removed("kv", layer))
        assert all(h // 3 not in removed_groups for h in p.removed("head", layer))
        assert len(p.kept("head", layer)) + len(p.removed_heads_all(layer)) == g.num_attention_heads
    assert p.param_count(LLAMA) <= Plan.empty(LLAMA).param_count(LLAMA)
