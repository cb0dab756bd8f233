"""RoutingTrace: validation, file format (own and foreign .npz), statistics, synthetic traces."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_compiler.routing_trace import FORMAT_VERSION, RoutingTrace, synthetic_trace


@st.composite
def traces(draw, max_tokens=40, max_layers=4, max_experts=10, weights=None):
    """Generates: a valid RoutingTrace with 0..max_tokens tokens, 1..max_layers layers,
    2..max_experts experts and top_k in 1..min(3, experts) distinct experts per row, drawn
    from a seeded numpy generator; router weights present or not (or as forced by
    ``weights``), a model name and either no layer names or one per layer."""
    tokens = draw(st.integers(0, max_tokens))
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(2, max_experts))
    k = draw(st.integers(1, min(3, experts)))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    ids = np.argsort(rng.random((tokens, layers, experts)), axis=-1)[..., :k]
    with_w = draw(st.booleans()) if weights is None else weights
    w = rng.random((tokens, layers, k)).astype(np.float32) if with_w else None
    names = tuple(f"model.layers.{i}.mlp" for i in range(layers)) if draw(st.booleans()) else ()
    return RoutingTrace(ids, w, experts, draw(st.sampled_from(["", "mixtral"])), names)


# ---------------------------------------------------------------------- statistics
@given(traces())
def test_statistics_match_plain_counting(tr):
    ids = tr.expert_ids
    for l in range(tr.num_layers):
        load = np.zeros(tr.num_experts, dtype=np.int64)
        for t in range(tr.num_tokens):
            for e in ids[t, l]:
                load[e] += 1
        assert np.array_equal(tr.expert_load(l), load)
        assert np.array_equal(tr.expert_loads()[l], load)
    for l in range(tr.num_layers - 1):
        trans = np.zeros((tr.num_experts, tr.num_experts), dtype=np.int64)
        for t in range(tr.num_tokens):
            for a in ids[t, l]:
                for b in ids[t, l + 1]:
                    trans[a, b] += 1
        got = tr.transition_counts(l)
        assert np.array_equal(got, trans)
        assert got.sum() == tr.num_tokens * tr.top_k ** 2


def test_layer_index_errors():
    tr = synthetic_trace(10, 3, 8, 2, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        tr.expert_load(3)
    with pytest.raises(IndexError, match="layer pairs"):
        tr.transition_counts(2)


# ---------------------------------------------------------------------- files
@given(traces())
def test_save_load_round_trip(tmp_path_factory, tr):
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    tr.save(path)
    back = RoutingTrace.load(path)
    assert back == tr
    assert back.expert_ids.dtype == np.int32
    with np.load(path) as npz:
        meta = json.loads(str(npz["metadata"][()]))
    assert meta["version"] == FORMAT_VERSION and meta["num_experts"] == tr.num_experts


def test_foreign_npz_infers_num_experts(tmp_path):
    ids = np.array([[[0, 3], [2, 1]], [[1, 2], [3, 0]]])
    np.savez(tmp_path / "f.npz", expert_ids=ids)
    tr = RoutingTrace.load(tmp_path / "f.npz")
    assert tr.num_experts == 4 and tr.weights is None and tr.model == ""
    tr8 = RoutingTrace.load(tmp_path / "f.npz", num_experts=8)
    assert tr8.num_experts == 8
    np.savez(tmp_path / "w.npz", expert_ids=ids, weights=np.ones(ids.shape))
    assert RoutingTrace.load(tmp_path / "w.npz").weights.dtype == np.float32


@pytest.mark.parametrize("arrays, kwargs, match", [
    ({"ids": np.zeros((2, 2, 1), int)}, {}, "missing 'expert_ids'"),
    ({"expert_ids": np.zeros((2, 2), int)}, {}, "3 dims"),
    ({"expert_ids": -np.ones((2, 2, 1), int)}, {}, "negative"),
    ({"expert_ids": np.zeros((2, 2, 1))}, {}, "must be integers"),
    ({"expert_ids": np.full((2, 2, 1), 5)}, {"num_experts": 4}, "num_experts=4"),
    ({"expert_ids": np.array([[[1, 1], [0, 1]]])}, {}, "duplicate expert"),
    ({"expert_ids": np.zeros((2, 2, 1), int), "weights": np.ones((2, 2))}, {}, "same shape"),
    ({"expert_ids": np.zeros((2, 2, 1), int),
      "metadata": np.array(json.dumps({"version": 99}))}, {}, "version 99"),
    ({"expert_ids": np.zeros((2, 2, 1), int),
      "metadata": np.array(json.dumps({"num_experts": 3}))}, {"num_experts": 5}, "records"),
])
def test_malformed_files_raise_clear_errors(tmp_path, arrays, kwargs, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as info:
        RoutingTrace.load(path, **kwargs)
    assert "bad.npz" in str(info.value)


def test_not_an_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable"):
        RoutingTrace.load(path)
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 1), int))
    with pytest.raises(ValueError, match="single array"):
        RoutingTrace.load(tmp_path / "a.npy")


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("ids, w, ne, names, match", [
    (np.zeros((2, 2), int), None, 4, (), "3 dims"),
    (np.zeros((2, 2, 1), float), None, 4, (), "integer dtype"),
    (np.zeros((2, 2, 1), bool), None, 4, (), "integer dtype"),
    (np.full((2, 2, 1), 4), None, 4, (), r"\[0, num_experts=4\)"),
    (np.full((2, 2, 1), -1), None, 4, (), "found -1"),
    (np.zeros((2, 2, 1), int), None, 0, (), "positive int"),
    (np.zeros((2, 2, 5), int), None, 4, (), "exceeds num_experts"),
    (np.array([[[1, 1]]]), None, 4, (), "duplicate expert"),
    (np.zeros((2, 2, 1), int), np.ones((2, 1, 1)), 4, (), "same shape"),
    (np.zeros((2, 2, 1), int), np.full((2, 2, 1), np.nan), 4, (), "NaN"),
    (np.zeros((2, 2, 1), int), None, 4, ("a",), "1 names but the trace has 2 layers"),
    (np.zeros((2, 0, 1), int), None, 4, (), "at least one layer"),
])
def test_constructor_validation(ids, w, ne, names, match):
    with pytest.raises(ValueError, match=match):
        RoutingTrace(ids, w, ne, "", names)


def test_constructor_does_not_touch_callers_array():
    ids = np.zeros((3, 2, 1), dtype=np.int32)
    tr = RoutingTrace(ids, None, 2)
    ids[0, 0, 0] = 1  # the caller's array stays writable and the trace keeps its copy
    assert tr.expert_ids[0, 0, 0] == 0
    assert not tr.expert_ids.flags.writeable
    with pytest.raises(TypeError):
        RoutingTrace([[[0]]], None, 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- combining
@given(traces(weights=True), st.integers(0, 50), st.integers(0, 50))
def test_concat_and_slice(tr, a, b):
    lo, hi = sorted((a, b))
    part = tr.slice_tokens(lo, hi)
    assert part.num_tokens == len(range(tr.num_tokens)[lo:hi])
    whole = RoutingTrace.concat([tr.slice_tokens(0, lo), tr.slice_tokens(lo, None)])
    assert whole == tr


def test_concat_rejects_mismatch():
    a = synthetic_trace(5, 2, 8, 2, seed=0)
    b = synthetic_trace(5, 3, 8, 2, seed=0)
    with pytest.raises(ValueError, match="layers, top_k, num_experts"):
        RoutingTrace.concat([a, b])
    with pytest.raises(ValueError, match="all traces carry weights"):
        RoutingTrace.concat([a, RoutingTrace(a.expert_ids, None, 8)])
    with pytest.raises(ValueError, match="at least one"):
        RoutingTrace.concat([])


# ---------------------------------------------------------------------- synthetic
def test_synthetic_trace_is_valid_and_seeded():
    kw = dict(zipf=1.0, affinity=0.9, collisions=0.1, coactivation=0.5, group_size=4)
    a = synthetic_trace(300, 5, 16, 2, seed=7, **kw)
    b = synthetic_trace(300, 5, 16, 2, seed=7, **kw)
    c = synthetic_trace(300, 5, 16, 2, seed=8, **kw)
    assert a == b and not a == c
    assert a.num_tokens == 300 and a.num_layers == 5 and a.top_k == 2
    # strong affinity: most transitions concentrate on one successor per expert
    t = a.transition_counts(0)
    assert (t.max(1).sum() / t.sum()) > 0.3
