"""Expert offloading: the store (tiers, budget, pins, policies), the disk tier's checks, and the
offload_experts / hoist_prefetch passes end to end (outputs bit-equal to the resident model)."""
from __future__ import annotations

import glob
import os
import re
import sys
import threading
import time

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_compiler
from moe_compiler.codegen.torch_experts import PackedWeights
from moe_compiler.config import ConfigError, make_config
from moe_compiler.modules import MoELayer
from moe_compiler.runtime import memory, offload
from moe_compiler.runtime.cache_policy import POLICIES, make_policy
from moe_compiler.runtime.expert_files import ExpertFiles, ExpertReadError
from moe_compiler.runtime.expert_store import LOADERS, PROCESS_PREFETCHES_AHEAD, ExpertStore, parse_bytes
from moe_compiler.runtime.loader_process import LoaderProcessError
from moe_compiler.runtime.quantize import dequantize_rows, quantize_rows


class Stack(nn.Module):
    """Embedding -> L x (RMSNorm -> MoELayer -> +): the smallest model with cross-layer gate inputs."""

    def __init__(self, layers=3, hidden=16, ffn=24, experts=6, top_k=2, vocab=50, seed=0, dtype=None):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden, dtype=dtype)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, dtype=dtype) for _ in range(layers))
        self.moes = nn.ModuleList(MoELayer(hidden, ffn, experts, top_k, dtype=dtype) for _ in range(layers))

    def forward(self, ids):
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return x


@pytest.fixture(autouse=True)
def _fresh_stores():
    offload.forget_stores()
    yield
    offload.forget_stores()


def _resident(model_args, ids_list):
    ref = Stack(**model_args)
    fn = torch.compile(ref, backend="moe", options={"inner_backend": "eager"})
    with torch.no_grad():
        fn(ids_list[0])  # the resident path packs its weights (oneDNN) from the second call on
        return [fn(ids) for ids in ids_list]


def _offloaded(model_args, ids_list, tmp_path, dump=None, **opts):
    model = Stack(**model_args)
    options = {"inner_backend": "eager", "offload": {"dir": str(tmp_path / "experts"), **opts}}
    if dump:
        options["dump_dir"] = dump
    fn = torch.compile(model, backend="moe", options=options)
    with torch.no_grad():
        outs = [fn(ids) for ids in ids_list]
    model.compiled = fn
    return model, outs, offload.store_for(offload.normalize_options(options["offload"]))[1]


# ------------------------------------------------------------------ options
def test_options_are_checked():
    assert offload.normalize_options(None) is None and offload.normalize_options(False) is None
    assert offload.normalize_options(True)["policy"] == "lru"
    for bad, msg in [({"budgte": 1}, "unknown keys"), ({"policy": "mru"}, "policy"), ({"budget": 1.5}, "fraction"),
                     ({"budget": "lots"}, "cannot read"), ({"prefetch_depth": 0}, "prefetch_depth"),
                     ({"prefetch": "yes"}, "prefetch"), ({"shallow_layers": -1}, "shallow_layers"),
                     ({"prefetch_extra": -1}, "prefetch_extra"), ({"prefetch_extra": 1.5}, "prefetch_extra"),
                     ({"prefetch_lookahead": 0}, r"prefetch_lookahead'\] must be an int >= 1"),
                     ({"prefetch_lookahead": True}, "prefetch_lookahead"),
                     ({"prefetch_source": "router"}, r"prefetch_source'\] must be one of \['gate', 'residual'\]"),
                     ({"loader": "fork"}, r"loader'\] must be one of \['thread', 'process', 'readahead'\]"),
                     ({"quantize": "int4"}, r"quantize'\] must be one of \[None, 'int8'\]")]:
        with pytest.raises(ConfigError, match=msg):
            make_config({"offload": bad})
    with pytest.raises(ConfigError, match="cannot be combined"):
        make_config({"offload": True, "expert_parallel": True})


def test_prediction_width_follows_prefetch_extra():
    from moe_compiler.codegen.offload_ops import predict, predicted_per_token
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    spec = MoESpec(RouterSpec(6, 2), ExpertSpec(8, 4))
    logits = torch.randn(5, 6)
    for extra, width in ((None, 3), (0, 2), (2, 4), (9, 6)):  # default 1; at most E
        s = spec if extra is None else spec.replace(notes=(("prefetch_extra", extra),))
        assert predicted_per_token(s) == width
        per_token, ranked, votes = predict(logits, None, s)
        assert per_token.shape == (5, width)
        assert torch.equal(per_token, torch.topk(torch.softmax(logits, -1), width, -1).indices)
        assert sum(votes.values()) == 5 * width and sorted(ranked) == sorted(votes)
        assert all(votes[a] >= votes[b] for a, b in zip(ranked, ranked[1:]))
    # one token (a decode step): its experts in the order it ranks them, not by id
    one = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5, -2.0]])
    assert predict(one, None, spec)[1] == [1, 3, 4]
    # equal votes (two each): the expert the tokens rank higher goes first; the picks are [1, 2], [1, 0], [2, 0]
    tied = torch.tensor([[-1.0, 5, 1, -1, -1, -1], [1.0, 5, -1, -1, -1, -1], [1.0, -1, 5, -1, -1, -1]])
    assert predict(tied, None, spec.replace(notes=(("prefetch_extra", 0),)))[1] == [1, 2, 0]


def test_parse_bytes():
    assert parse_bytes("2GB") == 2 * 10 ** 9 and parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes(0.25) == 0.25 and parse_bytes(1000) == 1000 and parse_bytes("1.5KB") == 1500
    for bad in (True, -1, 0.0, 2.0, "x"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ------------------------------------------------------------------ disk tier
def _layer(E=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(E, 6, 4, generator=g).to(dtype), "w2": torch.randn(E, 4, 3, generator=g).to(dtype)}


@pytest.mark.parametrize("direct", [True, False], ids=["direct_io", "buffered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_files_roundtrip(tmp_path, dtype, direct):
    files = ExpertFiles(str(tmp_path), direct_io=direct)
    w = _layer(dtype=dtype)
    sizes = files.write_layer("L", w)
    assert sizes == [(24 + 12) * w["w1"].element_size()] * 4
    man = files.manifest("L")
    for e in range(4):
        got = files.read_expert("L", e, man)
        assert all(torch.equal(got[n], w[n][e]) for n in w)


@pytest.mark.parametrize("direct", [True, False], ids=["direct_io", "buffered"])
def test_missing_and_corrupt_files_raise(tmp_path, direct):
    files = ExpertFiles(str(tmp_path), direct_io=direct)
    files.write_layer("L", _layer())
    man = files.manifest("L")
    os.remove(files.path("L", 1))
    with pytest.raises(ExpertReadError, match="expert 1"):
        files.read_expert("L", 1, man)
    path = files.path("L", 2)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF  # one flipped bit pattern in the tensor bytes
    open(path, "wb").write(bytes(data))
    with pytest.raises(ExpertReadError, match="corrupt"):
        files.read_expert("L", 2, man)
    open(files.path("L", 3), "wb").write(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ExpertReadError):
        files.read_expert("L", 3, man)


@pytest.mark.parametrize("direct", [True, False], ids=["direct_io", "buffered"])
@pytest.mark.parametrize("first_read", [False, True])
def test_damaged_files_raise_whether_or_not_the_layer_header_is_known(tmp_path, first_read, direct):
    """After a layer's first read its files are read by one scatter read against the known header
    (buffered) or into a staging buffer sized by the files seen (O_DIRECT): a flipped byte, a truncated
    file, another layout or garbage still raise ExpertReadError."""
    files = ExpertFiles(str(tmp_path), direct_io=direct)
    w = _layer(E=6)
    files.write_layer("L", w)
    other = ExpertFiles(str(tmp_path / "o"))
    other.write_layer("L", {"w1": torch.randn(1, 5, 4), "w2": torch.randn(1, 4, 3)})
    man = files.manifest("L")
    if first_read:
        assert torch.equal(files.read_expert("L", 0, man)["w1"], w["w1"][0])
    data = open(files.path("L", 1), "rb").read()
    open(files.path("L", 1), "wb").write(data[:-5])
    open(files.path("L", 2), "wb").write(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    open(files.path("L", 3), "wb").write(open(other.path("L", 0), "rb").read())
    open(files.path("L", 4), "wb").write(b"\x10\x00\x00\x00garbage")
    for e, msg in ((1, "expert 1"), (2, "corrupt"), (3, "manifest expects"), (4, "expert 4")):
        with pytest.raises(ExpertReadError, match=msg):
            files.read_expert("L", e, man)
    got = files.read_expert("L", 5, man)  # the intact file still reads, aligned like a fresh tensor
    assert all(torch.equal(got[n], w[n][5]) and got[n].data_ptr() % 64 == 0 for n in w)


def _loader_child():
    """The loader process's child module, loaded by path as the process runs it."""
    import importlib.util

    from moe_compiler.runtime import loader_process

    spec = importlib.util.spec_from_file_location("loader_child_under_test", loader_process.CHILD)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    return child


@settings(max_examples=30, deadline=None)
@given(direct=st.booleans(), first_read=st.booleans(), data=st.data())
def test_any_changed_tensor_byte_is_caught_by_every_reader(tmp_path_factory, direct, first_read, data):
    """The checksum covers every byte of every tensor (odd sizes, several dtypes, names out of file
    order): one changed byte anywhere after the header makes the thread's read (O_DIRECT or buffered,
    the layer's header known or not) and the loader child's check both report the file corrupt."""
    files = ExpertFiles(str(tmp_path_factory.mktemp("flip")), direct_io=direct)
    w = {"w2": torch.randn(3, 5, 3), "b1": torch.randn(3, 7).to(torch.bfloat16), "w1": torch.randn(3, 3, 5)}
    files.write_layer("L", w)
    man = files.manifest("L")
    if first_read:
        files.read_expert("L", 0, man)
    path = files.path("L", 1)
    raw = bytearray(open(path, "rb").read())
    base = 8 + int.from_bytes(raw[:8], "little")
    pos = data.draw(st.integers(base, len(raw) - 1), label="byte")
    raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ExpertReadError, match="corrupt"):
        files.read_expert("L", 1, man)
    assert "corrupt" in _loader_child()._check(memoryview(raw), len(raw), man["xxh3_64"][1])
    intact = bytearray(open(files.path("L", 2), "rb").read())
    assert _loader_child()._check(memoryview(intact), len(intact), man["xxh3_64"][2]) is None


def _direct_open(monkeypatch, refuse: bool):
    """Make os.open behave as a file system with O_DIRECT that accepts it (the flag is dropped, so the
    test runs on tmpfs too) or that refuses it with EINVAL."""
    import errno

    flag = getattr(os, "O_DIRECT", 0o40000)
    monkeypatch.setattr(os, "O_DIRECT", flag, raising=False)
    real_open = os.open

    def fake_open(path, flags, *a):
        if flags & flag:
            if refuse:
                raise OSError(errno.EINVAL, "Invalid argument")
            flags &= ~flag
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)


def test_direct_reads_grow_their_staging_buffer_for_a_larger_file(tmp_path, monkeypatch):
    """A file larger than any the layer had: the read fills the staging buffer, which then grows to
    the file's size; the tensors are the written ones."""
    _direct_open(monkeypatch, refuse=False)
    files = ExpertFiles(str(tmp_path))
    files.direct_io = True   # as on Linux, whatever this OS is
    small = _layer(E=2)
    files.write_layer("L", small)
    man = files.manifest("L")
    assert torch.equal(files.read_expert("L", 0, man)["w1"], small["w1"][0])
    big = {"w1": torch.randn(2, 3000, 4), "w2": torch.randn(2, 4, 3)}   # 48 KB files after 0.2 KB ones
    files.write_layer("L", big)
    man = files.manifest("L")
    got = files.read_expert("L", 1, man)
    assert files.direct_io and all(torch.equal(got[n], big[n][1]) for n in big)
    assert files._file_bytes["L"] == os.path.getsize(files.path("L", 1))


def test_direct_reads_fall_back_where_the_os_refuses(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT (EINVAL): the reader turns it off and reads buffered."""
    _direct_open(monkeypatch, refuse=True)
    files = ExpertFiles(str(tmp_path))
    files.direct_io = True
    w = _layer(E=2)
    files.write_layer("L", w)
    got = files.read_expert("L", 0, files.manifest("L"))
    assert not files.direct_io and all(torch.equal(got[n], w[n][0]) for n in w)


# ------------------------------------------------------------------ the store
def _store(tmp_path, layers, budget, policy, **kw):
    store = ExpertStore(str(tmp_path / "s"), budget=budget, policy=policy, **kw)
    for i, w in enumerate(layers):
        store.add_layer(f"layer{i}", w, transposed=False)
    store.check_budget()
    return store


def test_budget_below_one_expert_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="smaller than one expert"):
        _store(tmp_path, [_layer()], budget=10, policy="lru")


@given(num_layers=st.integers(1, 3), experts=st.integers(1, 6), budget=st.floats(0.05, 1.0),
       policy=st.sampled_from(POLICIES), host=st.sampled_from([0, 0.5]), loader=st.sampled_from(LOADERS),
       steps=st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=6), st.lists(st.integers(0, 5), max_size=4)),
                      min_size=1, max_size=6))
@settings(max_examples=20)
def test_store_budget_pins_and_values(tmp_path_factory, num_layers, experts, budget, policy, host, loader, steps):
    tmp = tmp_path_factory.mktemp("store")
    layers = [_layer(experts, seed=i) for i in range(num_layers)]
    budget = max(budget, 1.0 / (experts * num_layers))  # at least one expert (else a clear error)
    store = _store(tmp, layers, budget, policy, host_budget=host, loader=loader)
    for used, predicted in steps:
        for layer in range(num_layers):
            nxt = (layer + 1) % num_layers
            store.prefetch(nxt, [e % experts for e in predicted], votes={e % experts: 1 for e in predicted})
            order = store.begin_step(layer, sorted({e % experts for e in used}))
            assert sorted(order) == sorted({e % experts for e in used})
            for e in order:
                with store.use(layer, e) as w:
                    # meanwhile, other loads must not evict this expert nor break the budget
                    store.prefetch(nxt, list(range(experts)))
                    assert store.cached_bytes() <= store.budget
                    assert torch.equal(w["w1"], layers[layer]["w1"][e]) and torch.equal(w["w2"], layers[layer]["w2"][e])
                    assert (layer, e) in store._entries
            assert store.cached_bytes() <= store.budget
    store.drain()
    assert store.peak_bytes <= store.budget
    s = store.stats()
    assert s["hits"] + s["misses"] == sum(len({e % experts for e in u}) for u, _ in steps) * num_layers
    store.close()


@given(tokens=st.integers(0, 80), k=st.integers(1, 4), extra=st.integers(0, 2), seed=st.integers(0, 99))
@settings(max_examples=20)
def test_token_recall_counts_small_and_large_steps_alike(tokens, k, extra, seed):
    from moe_compiler.runtime.expert_store import _routed_in_prediction

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8, (tokens, k), generator=g)
    pred = torch.randint(0, 8, (tokens, k + extra), generator=g)
    want = int((ids.unsqueeze(-1) == pred.unsqueeze(1)).any(-1).sum())
    assert _routed_in_prediction(ids, pred) == want


def test_predicted_demand_decays_like_the_plain_recurrence_over_long_runs():
    """The predicted-demand policy decays a layer by scaling it (folded in before it underflows):
    after thousands of predictions each expert's demand and each layer's total still equal the
    plain recurrence d <- decay * d + votes, and stay finite."""
    import random

    p = make_policy("predicted")
    p.setup([1, 1], [6, 6], 6)
    rng = random.Random(0)
    plain = {(l, e): 0.0 for l in range(2) for e in range(6)}
    for step in range(5000):
        layer = step % 2
        votes = {rng.randrange(6): rng.randint(1, 3) for _ in range(2)}
        p.on_prediction(layer, votes)
        total = sum(votes.values())
        for e in range(6):
            plain[(layer, e)] = plain[(layer, e)] * p.decay + votes.get(e, 0) / total
        if step % 7 == 0:
            p.on_use(layer, [step % 6])
            plain[(layer, step % 6)] += 1.0
    for key, want in plain.items():
        assert p.demand_of(key) == pytest.approx(want, rel=1e-9, abs=1e-300)
    for layer in range(2):
        assert p._total[layer] == pytest.approx(sum(v for k, v in plain.items() if k[0] == layer), rel=1e-9)


@given(policy=st.sampled_from(POLICIES), data=st.data())
@settings(max_examples=60, deadline=None)
def test_policy_order_survives_evictions_while_iterating(policy, data):
    """A store walks ``order`` and evicts some of the keys it is given as it goes (the orders read
    the cache a batch at a time, not from a copy): every key the policy holds is still given exactly
    once, in the order it had when the walk began, and the evicted keys are gone afterwards."""
    p = make_policy(policy)
    p.setup([10, 20, 10], [40, 40, 40], 400)
    held = []
    keys = st.tuples(st.integers(0, 2), st.integers(0, 39))
    for key in data.draw(st.lists(keys, min_size=1, max_size=80), label="events"):
        if key in held:
            p.on_access(key)
        else:
            p.on_insert(key)
            held.append(key)
        p.on_prediction(key[0], {key[1]: 1, (key[1] + 1) % 40: 2})
        p.on_use(key[0], [key[1]])
    incoming = data.draw(keys, label="incoming")
    before = list(p.order(incoming))
    assert sorted(before) == sorted(held)
    walked, evicted = [], set()
    for key in p.order(incoming):
        walked.append(key)
        if data.draw(st.booleans(), label=f"evict {key}"):
            p.on_evict(key)
            evicted.add(key)
    assert walked == before
    assert sorted(p.order(incoming)) == sorted(k for k in held if k not in evicted)


@given(policy=st.sampled_from(["shallow", "predicted"]), events=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)),
                                                                       min_size=1, max_size=30),
       incoming=st.tuples(st.integers(0, 2), st.integers(0, 3)))
@settings(max_examples=30)
def test_quota_victims_order(policy, events, incoming):
    """Quota policies: every resident key once; layers by bytes over quota, most first; inside a
    layer, least predicted demand first (predicted) or least recently used first (shallow)."""
    p = make_policy(policy)
    p.setup([10, 20, 10], [4, 4, 4], 60)
    resident = []
    for key in events:
        p.on_access(key) if key in resident else (p.on_insert(key), resident.append(key))
        if policy == "predicted":
            p.on_prediction(key[0], {key[1]: 1})
    order = p.victims(resident, incoming)
    assert sorted(order) == sorted(resident)
    quotas = p.quotas()
    held = {l: sum(k[0] == l for k in resident) for l in range(3)}
    over = [(held[k[0]] + (k[0] == incoming[0])) * p.expert_bytes[k[0]] - quotas[k[0]] for k in order]
    assert over == sorted(over, reverse=True)
    for layer in range(3):
        mine = [k for k in order if k[0] == layer]
        recency = [k for k in events[::-1] if k[0] == layer]   # the latest event of a key is its last use
        recency = sorted(set(recency), key=recency.index, reverse=True)
        if policy == "shallow":
            assert mine == sorted(mine, key=recency.index)
        else:   # least demand first, then least recently used
            assert mine == sorted(mine, key=lambda k: (p._stored[layer].get(k[1], 0.0), recency.index(k)))
            demand = [p.demand_of(k) for k in mine]
            assert demand == sorted(demand)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("prefetched", [False, True])
def test_store_reports_a_failing_read(tmp_path, loader, prefetched):
    """A missing or corrupt file raises ExpertReadError naming it, whether the layer's own call read it
    or a prefetch did (on the loader thread or in the loader process); the other experts still load."""
    store = _store(tmp_path, [_layer()], budget=1.0, policy="lru", loader=loader)
    os.remove(store.files.path(store.layers[0].folder, 2))
    path = store.files.path(store.layers[0].folder, 3)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    if prefetched:
        store.prefetch(0, [2, 3, 1])
        store.drain()
    with pytest.raises(ExpertReadError, match="expert 2"):
        with store.use(0, 2):
            pass
    with pytest.raises(ExpertReadError, match="corrupt"):
        with store.use(0, 3):
            pass
    with store.use(0, 1) as w:  # the others still load
        assert torch.equal(w["w1"], _layer()["w1"][1])
    store.close()


def test_loader_process_serves_more_reads_than_it_has_slots(tmp_path):
    """More prefetches than staging slots wait for a free slot (demand ones first); every value is right."""
    layers = [_layer(40, seed=0), _layer(40, seed=1)]
    store = _store(tmp_path, layers, budget=1.0, policy="lru", loader="process")
    store.prefetch(0, range(40))
    store.prefetch(1, range(40))
    assert store._unsent  # 80 reads, at most 16 slots
    order = store.begin_step(1, [39, 38])  # needed now: sent ahead of the queued prefetches
    for e in order:
        with store.use(1, e) as w:
            assert torch.equal(w["w2"], layers[1]["w2"][e])
    store.drain()
    assert not store._unsent and store._proc.in_flight() == 0
    resident = store.resident()
    # layer 1's other predicted experts were dropped by begin_step unless their reads had started
    assert [k for k in resident if k[0] == 0] == [(0, e) for e in range(40)] and {(1, 38), (1, 39)} <= set(resident)
    for l in range(2):
        for e in range(40):
            with store.use(l, e) as w:
                assert torch.equal(w["w1"], layers[l]["w1"][e]) and torch.equal(w["w2"], layers[l]["w2"][e])
    assert store.stats()["bytes_loaded"] == store.total_expert_bytes
    store.close()


def test_loader_process_holds_few_prefetches_so_a_step_can_drop_the_rest(tmp_path):
    """The loader process is handed PROCESS_PREFETCHES_AHEAD prefetches at a time; a step that uses none
    of the predicted experts drops those still waiting in the store, so they are never read."""
    ahead = PROCESS_PREFETCHES_AHEAD
    layers = [_layer(12, seed=0)]
    store = _store(tmp_path, layers, budget=1.0, policy="lru", loader="process")
    assert store.prefetch(0, range(11)) == list(range(11))
    assert store._proc.in_flight() == ahead and len(store._unsent) == 11 - ahead
    assert store.begin_step(0, [11]) == [11]   # drops the waiting ones before it sends any more
    with store.use(0, 11) as w:
        assert torch.equal(w["w1"], layers[0]["w1"][11])
    store.drain()
    resident = sorted(store.resident())
    assert resident == [(0, e) for e in range(ahead)] + [(0, 11)]
    sizes = store.layers[0].manifest["bytes"]
    assert store.stats()["bytes_loaded"] == sum(sizes[e] for _, e in resident)
    for e in range(12):   # a dropped prefetch still loads when used
        with store.use(0, e) as w:
            assert torch.equal(w["w2"], layers[0]["w2"][e])
    store.close()


def test_a_step_drops_the_predicted_loads_it_does_not_use_and_nobody_started(tmp_path):
    """begin_step forgets the layer's unused prefetches still waiting for a loader (their room comes
    back); a loaded one stays cached, and a dropped one still loads when a later step uses it."""
    layers = [_layer(6, seed=0)]
    store = _store(tmp_path, layers, budget=1.0, policy="lru", loader="readahead")  # nothing starts by itself
    assert store.prefetch(0, [1, 2, 3]) == [1, 2, 3]
    with store.use(0, 3) as w:   # loaded before the step: stays
        assert torch.equal(w["w1"], layers[0]["w1"][3])
    used = store.cached_bytes()
    assert store.begin_step(0, [1, 4]) == [1, 4]
    assert sorted(store._entries) == [(0, 1), (0, 3), (0, 4)]
    sizes = store.layers[0].manifest["bytes"]
    assert store.cached_bytes() == used - sizes[2] + sizes[4]
    for e in (1, 4, 2):
        with store.use(0, e) as w:
            assert torch.equal(w["w1"], layers[0]["w1"][e])
    assert store.stats()["prefetched"] == 3 and store.stats()["prefetch_used"] == 1
    store.close()


def test_a_nearer_prediction_supersedes_a_farther_one(tmp_path):
    """prefetch_lookahead: a layer's later (nearer) prediction drops the earlier one's unstarted loads it
    no longer predicts and keeps the rest; a dropped expert still loads when a step uses it."""
    layers = [_layer(6, seed=0)]
    store = _store(tmp_path, layers, budget=1.0, policy="lru", loader="readahead")  # nothing starts by itself
    assert store.prefetch(0, [1, 2, 3], ahead=1) == [1, 2, 3]
    with store.use(0, 3) as w:   # loaded: a later prediction without it leaves it cached
        assert torch.equal(w["w1"], layers[0]["w1"][3])
    assert store.prefetch(0, [2, 4]) == [2, 4]
    assert sorted(store._entries) == [(0, 2), (0, 3), (0, 4)]
    sizes = store.layers[0].manifest["bytes"]
    assert store.cached_bytes() == sizes[2] + sizes[3] + sizes[4]
    assert store.begin_step(0, [1, 4]) == [4, 1]
    for e in (1, 4):
        with store.use(0, e) as w:
            assert torch.equal(w["w1"], layers[0]["w1"][e])
    s = store.stats()
    assert s["prefetched"] == 4 and s["prefetch_used"] == 1 and s["misses"] == 1
    assert s["prediction_recall"] == 0.5   # recall counts the nearest prediction: {2, 4} against {1, 4}
    store.close()


def test_loads_are_queued_nearest_prediction_first(tmp_path):
    """A farther prediction's loads wait behind every nearer prediction's, issued before or after it; one
    it shares with a nearer prediction moves up to that prediction's place."""
    import threading

    layers = [_layer(4, seed=i) for i in range(3)]
    store = _store(tmp_path, layers, budget=1.0, policy="lru", loader="thread")
    gate, order, read = threading.Event(), [], store._read_raw

    def reading(key):
        order.append(key)
        gate.wait(10)
        return read(key)

    store._read_raw = reading
    store.prefetch(0, [0])               # the loader takes it and waits at the gate
    deadline = time.monotonic() + 10
    while not order and time.monotonic() < deadline:
        time.sleep(0.01)
    store.prefetch(1, [0, 1], ahead=1)   # layer 1, predicted a source early
    store.prefetch(2, [0])               # layer 2's nearest prediction, issued later
    store.prefetch(1, [1])               # layer 1's nearest: drops (1, 0), moves (1, 1) up
    gate.set()
    for key in ((2, 0), (1, 1)):   # (not drain(): it reads a load nobody has started itself)
        assert store._entries[key].ready.wait(10)
    assert order == [(0, 0), (2, 0), (1, 1)]
    for layer, e in ((1, 1), (2, 0)):
        with store.use(layer, e) as w:
            assert torch.equal(w["w1"], layers[layer]["w1"][e])
    store.close()


@pytest.mark.parametrize("refuse", [None, "open", "read"])
def test_loader_process_child_reads_past_the_page_cache_or_falls_back(tmp_path, monkeypatch, refuse):
    """The loader child reads a file into its block-aligned slot with O_DIRECT (whole blocks) where the
    file system takes it; one that refuses the flag on open or on read (EINVAL) gets a buffered read
    and the child stops asking. A file larger than the slot is an error, not a partial read."""
    import errno
    import fcntl
    import mmap

    child = _loader_child()
    data = os.urandom(3 * child.BLOCK + 123)   # not a whole number of blocks
    path = tmp_path / "expert.bin"
    path.write_bytes(data)
    if refuse == "open" and hasattr(os, "O_DIRECT"):
        _direct_open(monkeypatch, refuse=True)
    elif refuse == "read" and hasattr(os, "O_DIRECT"):
        real_preadv = os.preadv

        def reading(fd, buffers, offset):   # no read through O_DIRECT
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", reading)
    slot = mmap.mmap(-1, 4 * child.BLOCK)   # page-aligned, as the staging file's slots are
    view = memoryview(slot)
    assert child._read_into(str(path), view, True) == len(data)
    assert bytes(view[:len(data)]) == data
    assert child._direct[0] == (refuse is None and hasattr(os, "O_DIRECT"))
    with pytest.raises(ValueError, match="more than the staging slot"):
        child._read_into(str(path), view[:2 * child.BLOCK], True)
    assert child._read_into(str(path), view, False) == len(data)   # buffered, pages dropped afterwards
    del view
    slot.close()


def test_loader_process_slots_grow_for_a_larger_layer(tmp_path):
    small, big = _layer(4, seed=0), {"w1": torch.randn(3, 64, 32), "w2": torch.randn(3, 32, 64)}
    store = _store(tmp_path, [small], budget=1.0, policy="lru", loader="process")
    store.prefetch(0, [0, 1])
    store.drain()
    before = store._proc.slot_bytes
    store.add_layer("big", big, transposed=False)
    store.prefetch(1, [0, 1, 2])
    store.drain()
    assert store._proc.slot_bytes > before
    for e in range(3):
        with store.use(1, e) as w:
            assert torch.equal(w["w2"], big["w2"][e])
    store.close()


def test_a_dead_loader_process_fails_clearly_and_a_later_load_restarts_it(tmp_path):
    import signal

    layer = _layer(8)
    store = _store(tmp_path, [layer], budget=1.0, policy="lru", loader="process")
    store.prefetch(0, [0])
    store.drain()
    proc = store._proc.proc
    os.kill(proc.pid, signal.SIGSTOP)  # requests reach its pipe but are never answered
    store.prefetch(0, [1, 2])
    proc.kill()
    proc.wait()
    with pytest.raises(LoaderProcessError, match="loader process exited"):
        with store.use(0, 1):
            pass
    assert store._proc is None and store.resident() == [(0, 0)]  # the reads in flight left the fast tier
    with store.use(0, 1) as w:  # read again, by the caller
        assert torch.equal(w["w1"], layer["w1"][1])
    store.prefetch(0, [2, 5])  # a fresh loader process
    store.drain()
    assert store._proc.proc.pid != proc.pid
    for e in (2, 5):
        with store.use(0, e) as w:
            assert torch.equal(w["w1"], layer["w1"][e])
    proc = store._proc.proc
    proc.kill()
    proc.wait()
    with pytest.raises(LoaderProcessError, match="loader process exited"):
        store.prefetch(0, [6])  # a dead process cannot take a request: said at once
    with store.use(0, 6) as w:
        assert torch.equal(w["w1"], layer["w1"][6])
    store.close()


# ------------------------------------------------------------------ compiled end to end
MODEL = dict(layers=3, hidden=16, ffn=24, experts=6, top_k=2)


@given(budget=st.sampled_from([0.2, 0.5, 1.0]), policy=st.sampled_from(POLICIES), prefetch=st.booleans(),
       seed=st.integers(0, 3), loader=st.sampled_from(LOADERS))
@settings(max_examples=8)
def test_offloaded_model_equals_resident(tmp_path_factory, budget, policy, prefetch, seed, loader):
    torch._dynamo.reset()
    offload.forget_stores()
    tmp = tmp_path_factory.mktemp("off")
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 50, (2, 5), generator=g) for _ in range(3)]
    ref = _resident(MODEL, ids)
    model, outs, store = _offloaded(MODEL, ids, tmp, budget=budget, policy=policy, prefetch=prefetch, loader=loader)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    assert store.peak_bytes <= store.budget
    assert all(p.untyped_storage().nbytes() == 0 for m in model.moes for p in (m.gate_up_proj, m.down_proj))
    assert all(m.router.untyped_storage().nbytes() > 0 for m in model.moes)  # routers stay resident


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_offloaded_half_precision_model_equals_resident(tmp_path, dtype):
    """bf16 experts are oneDNN-packed only where the CPU can pack them (AVX512-BW/VL/DQ or AVX-NE-CONVERT);
    elsewhere, and for fp16, they stay plain, and the outputs stay bit-equal either way."""
    args = dict(MODEL, hidden=64, ffn=96, dtype=dtype)
    ids = [torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 9))]
    ref = _resident(args, ids)
    torch._dynamo.reset()
    _, outs, store = _offloaded(args, ids, tmp_path, budget=0.5, policy="shallow")
    for a, b in zip(outs, ref):
        assert a.dtype == dtype and torch.equal(a, b)
    assert store.peak_bytes <= store.budget


def test_hoisted_prefetch_in_dumps_and_recompile(tmp_path):
    ids = [torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (2, 5))]
    ref = _resident(MODEL, ids)
    torch._dynamo.reset()
    model, outs, store = _offloaded(MODEL, ids, tmp_path, dump=str(tmp_path / "dumps"), budget=0.5)
    for a, b in zip(outs, ref):  # the second shape recompiles with the released weights restored
        assert torch.equal(a, b)
    after = glob.glob(str(tmp_path / "dumps" / "*" / "*_hoist_prefetch.after.py"))
    assert after
    text = open(sorted(after)[0]).read()
    assert text.count("prefetch_experts.default(") == MODEL["layers"]
    assert "predicted from the embedding output" in text and "predicted from layer 0" in text
    s = store.stats()
    assert s["prediction_recall"] is not None and 0 <= s["prediction_recall"] <= 1
    assert len(store.layers) == MODEL["layers"]  # the recompile reused the layers
    assert all(p.untyped_storage().nbytes() == 0 for m in model.moes for p in (m.gate_up_proj, m.down_proj))


def test_residual_prefetch_source(tmp_path):
    """prefetch_source "residual": each layer is predicted through its own norm and router from the residual
    stream before its last residual branch; outputs stay bit-equal and the dump says where it came from."""
    ids = [torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (2, 5))]
    ref = _resident(MODEL, ids)
    torch._dynamo.reset()
    model, outs, store = _offloaded(MODEL, ids, tmp_path, dump=str(tmp_path / "dumps"), budget=0.5,
                                    prefetch_source="residual")
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    text = open(sorted(glob.glob(str(tmp_path / "dumps" / "*" / "*_hoist_prefetch.after.py")))[0]).read()
    assert text.count("prefetch_experts.default(") == MODEL["layers"]
    # layer 0's block has no residual branch before it: the embedding output (Fate's first-layer rule)
    assert text.count("predicted from the residual stream") == MODEL["layers"] - 1, text
    assert store.stats()["prediction_recall"] is not None


@pytest.mark.parametrize("source", ["gate", "residual"])
def test_prefetch_lookahead_predicts_each_layer_from_several_sources(tmp_path, source):
    """prefetch_lookahead 2: each layer is predicted from its nearest source and from the one a layer further
    back, chained farthest first; outputs stay bit-equal. Nothing comes before the embedding output, so the
    layers it is already the nearest source of have one prediction (gate: layer 0; residual: layers 0 and 1,
    since Stack's layer 1 reads the embedding output plus layer 0's branch)."""
    ids = [torch.randint(0, 50, (2, 5)), torch.randint(0, 50, (1, 3)), torch.randint(0, 50, (2, 5))]
    ref = _resident(MODEL, ids)
    torch._dynamo.reset()
    _, outs, store = _offloaded(MODEL, ids, tmp_path, dump=str(tmp_path / "dumps"), budget=0.5,
                                prefetch_source=source, prefetch_lookahead=2)
    for a, b in zip(outs, ref):
        assert torch.equal(a, b)
    assert store.peak_bytes <= store.budget
    text = open(sorted(glob.glob(str(tmp_path / "dumps" / "*" / "*_hoist_prefetch.after.py")))[0]).read()
    twice = range(1 if source == "gate" else 2, MODEL["layers"])
    assert text.count("prefetch_experts.default(") == MODEL["layers"] + len(twice), text
    assert text.count("earlier, nearest first, from") == len(twice)
    graph = text[text.index("def forward"):]
    for m in twice:
        # the farther prediction of layer m is an input of the nearer one (it runs first)
        far, near = [line for line in graph.splitlines()
                     if "prefetch_experts.default(" in line and f", {m}, " in line]
        far_name = re.match(r"\s*(\w+)", far).group(1)
        assert re.search(rf"\b{far_name}\)", near.split("prefetch_experts.default(")[1]), (far, near)
    assert store.stats()["prediction_recall"] is not None


def test_a_missing_expert_file_fails_the_call(tmp_path):
    ids = torch.randint(0, 50, (2, 5))
    model, _, store = _offloaded(MODEL, [ids], tmp_path, budget=0.2, prefetch=False)
    for layer in store.layers:
        for path in glob.glob(os.path.join(store.root, layer.folder, "expert_*.safetensors")):
            os.remove(path)
    with pytest.raises(ExpertReadError, match="cannot read expert"), torch.no_grad():
        model.compiled(torch.randint(0, 50, (2, 5)))  # no recompile: the op's loads fail, loudly


def test_released_layer_called_eagerly_says_why(tmp_path):
    ids = torch.randint(0, 50, (2, 5))
    model, _, store = _offloaded(MODEL, [ids], tmp_path, budget=0.5, prefetch=False)
    # what torch._dynamo does past its recompile limit: run the module uncompiled
    with pytest.raises(RuntimeError, match="released to an offload store.*recompile_limit"), torch.no_grad():
        model(ids)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and memory.can_return_freed_memory()),
                    reason="malloc_trim is glibc's (Linux); elsewhere return_freed_memory does nothing")
def test_freed_expert_blocks_go_back_to_the_os():
    def rss_mib():
        return memory.process_status_bytes("VmRSS") / 2 ** 20

    big = torch.ones(16 * 2 ** 20 // 4)  # freeing a mapped 16 MiB block raises glibc's mmap threshold ...
    del big
    blocks = [torch.ones(8 * 2 ** 20 // 4) for _ in range(24)]  # ... so these come from the heap
    after = torch.ones(1024)  # allocated after them: they are not at the heap's top (no automatic trim)
    before = rss_mib()
    del blocks
    assert memory.return_freed_memory()
    assert rss_mib() < before - 100  # 192 MiB written and freed: most of it left the process
    del after


def test_store_clear_frees_the_fast_tier(tmp_path):
    ids = torch.randint(0, 50, (2, 5))
    model, _, store = _offloaded(MODEL, [ids], tmp_path, budget=0.5, prefetch=False)
    store.drain()
    cached = store.cached_bytes()
    assert cached > 0 and store.clear() == cached
    assert store.cached_bytes() == 0 and store.resident() == []
    with torch.no_grad():
        model.compiled(ids)  # loads again from disk
    assert store.cached_bytes() > 0


@pytest.mark.parametrize("loader", LOADERS)
def test_store_close_stops_the_loader_and_a_later_load_restarts_it(tmp_path, loader):
    ids = torch.randint(0, 50, (2, 5))
    model, outs, store = _offloaded(MODEL, [ids], tmp_path, budget=0.5, loader=loader)
    for layer in range(len(store.layers)):  # queue more loads than the loader can have started
        store.prefetch(layer, range(store.layers[layer].num_experts))
    store.close()
    if loader == "thread":
        assert not store._thread.is_alive() and not store._preparer.is_alive()
    else:
        assert store._proc is None and not store._unsent
    assert all(entry.done for entry in store._entries.values())  # the unstarted ones were dropped
    assert store.cached_bytes() == sum(entry.nbytes for entry in store._entries.values()) <= store.budget
    store.drain()  # nothing left to wait for
    store.clear()
    with torch.no_grad():
        assert torch.equal(model.compiled(ids), outs[0])
    store.drain()
    assert store.cached_bytes() > 0


def test_explain_reports_offload_metrics(tmp_path):
    model = Stack(**MODEL)
    report = moe_compiler.explain(model, torch.randint(0, 50, (2, 8)), inner_backend="eager",
                                  offload={"dir": str(tmp_path / "e"), "budget": 0.5})
    o = report.offload
    assert o["policy"] == "lru" and len(o["layers"]) == MODEL["layers"] and o["hits"] + o["misses"] > 0
    assert "offload (lru" in str(report) and "hit rate" in str(report) and "already loaded" in str(report)
    assert 0 <= o["ready"] <= o["hits"] and sum(layer["ready"] for layer in o["layers"]) == o["ready"]
    assert 0 <= o["prefetches_read_by_caller"] <= o["read_by_caller"] and "read by the model's thread" in str(report)
    assert model.moes[0].gate_up_proj.untyped_storage().nbytes() > 0  # explain does not free weights


def test_training_graphs_stay_resident(tmp_path):
    model = Stack(**MODEL)
    fn = torch.compile(model, backend="moe", options={"inner_backend": "eager",
                                                     "offload": {"dir": str(tmp_path / "e")}})
    fn(torch.randint(0, 50, (2, 5))).sum().backward()
    assert model.moes[0].gate_up_proj.grad is not None
    assert model.moes[0].gate_up_proj.untyped_storage().nbytes() > 0


# ------------------------------------------------------------------ the ops on edge cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [0, 1, 9])
def test_offloaded_op_edge_cases(tmp_path, dtype, tokens):
    from moe_compiler.codegen.offload_ops import OFFLOADED_EXPERTS_OP, PREFETCH_EXPERTS_OP
    from moe_compiler.codegen.ops import GROUPED_EXPERTS_OP

    torch.manual_seed(tokens)
    layer = MoELayer(8, 12, 5, 2, dtype=dtype)
    spec = layer.spec.to_json()
    store_id, store = offload.store_for(offload.normalize_options({"dir": str(tmp_path / "e"), "budget": 0.4}))
    store.add_layer("l", {"w1": layer.gate_up_proj.detach(), "w2": layer.down_proj.detach()}, transposed=False)
    x = torch.randn(tokens, 8, dtype=dtype)
    ids = torch.zeros(tokens, 2, dtype=torch.int64)  # every token to experts 0 and 1 ...
    ids[:, 1] = 1
    w = torch.rand(tokens, 2)
    logits = torch.full((tokens, 5), float("nan"))  # ... and a prediction from NaN logits
    pred = PREFETCH_EXPERTS_OP(logits, None, store_id, 0, spec)
    assert pred.shape == (tokens, 3)
    y = OFFLOADED_EXPERTS_OP(x, ids, w, pred, store_id, 0, spec)
    want = GROUPED_EXPERTS_OP(x, ids, w, layer.gate_up_proj.detach(), None, layer.down_proj.detach(), None, None,
                              None, spec)
    torch.testing.assert_close(y, want, rtol=0, atol=0) if dtype == torch.float32 else \
        torch.testing.assert_close(y, want)
    assert y.shape == (tokens, 8) and y.dtype == dtype


@pytest.mark.skipif(not PackedWeights.available(torch.ones(1)), reason="no oneDNN in this torch build")
def test_prepacked_layer_keeps_only_the_packed_copy(tmp_path):
    from moe_compiler.codegen.offload_ops import OFFLOADED_EXPERTS_OP
    from moe_compiler.codegen.ops import GROUPED_EXPERTS_OP

    torch.manual_seed(0)
    layer = MoELayer(16, 24, 4, 2)
    spec = layer.spec.to_json()
    store_id, store = offload.store_for(offload.normalize_options({"dir": str(tmp_path / "e"), "budget": 1.0}))
    store.add_layer("l", {"w1": layer.gate_up_proj.detach(), "w2": layer.down_proj.detach()}, transposed=False,
                    prepack=("w1", "w2"))
    x, ids, w = torch.randn(7, 16), torch.randint(0, 4, (7, 2)), torch.rand(7, 2)
    y = OFFLOADED_EXPERTS_OP(x, ids, w, None, store_id, 0, spec)
    want = GROUPED_EXPERTS_OP(x, ids, w, layer.gate_up_proj.detach(), None, layer.down_proj.detach(), None, None,
                              None, spec)
    torch.testing.assert_close(y, want)  # oneDNN's GEMM, not bit-equal to torch.mm
    with store.use(0, int(ids[0, 0])) as tensors:
        assert sorted(tensors) == ["packed:w1", "packed:w2"]  # the raw copy is not kept beside it


# ------------------------------------------------------------------ int8 cached copies (option quantize)
@given(rows=st.integers(1, 9), cols=st.integers(1, 33), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                              torch.bfloat16]),
       zero_row=st.booleans(), seed=st.integers(0, 99))
@settings(max_examples=30)
def test_int8_rows_roundtrip_within_half_a_step(rows, cols, dtype, zero_row, seed):
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    if zero_row:
        w[0] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (rows, 1) and int(q.abs().max()) <= 127
    back = dequantize_rows(q, scale, dtype)
    assert back.dtype == dtype and back.shape == w.shape
    step = scale.expand_as(w)
    rounding = w.float().abs() * (torch.finfo(dtype).eps if dtype != torch.float32 else 0)  # casting back
    assert bool(((back.float() - w.float()).abs() <= step / 2 + rounding + 1e-6).all())
    if zero_row:
        assert bool((back[0] == 0).all())


@pytest.mark.parametrize("loader", LOADERS)
def test_int8_store_holds_quarter_size_copies(tmp_path, loader):
    g = torch.Generator().manual_seed(0)
    layers = [{"w1": torch.randn(8, 32, 16, generator=g), "w2": torch.randn(8, 16, 32, generator=g)} for _ in range(2)]
    store = _store(tmp_path, layers, budget=0.3, policy="lru", quantize="int8", loader=loader)
    lay = store.layers[0]
    assert lay.quantized == ("w1", "w2") and lay.cached_bytes == (512 + 4 * 32) + (512 + 4 * 16)
    assert lay.expert_bytes == 4 * 1024  # fractional budgets stay fractions of the full-precision bytes
    for l in range(2):
        store.prefetch(l, range(8))
    store.drain()
    assert store.cached_bytes() <= store.budget == int(0.3 * 16 * 4096)
    assert len(store.resident()) == 16  # all 16 fit in 30% of their fp32 bytes
    for l in range(2):
        for e in range(8):
            with store.use(l, e) as w:
                for n in ("w1", "w2"):
                    ref = layers[l][n][e]
                    assert w[n].dtype == ref.dtype and w[n].shape == ref.shape
                    step = ref.abs().amax(-1, keepdim=True) / 127
                    assert bool(((w[n] - ref).abs() <= step / 2 + 1e-6).all())
    assert store.stats()["quantize"] == "int8"
    store.close()


def test_int8_refuses_non_finite_weights(tmp_path):
    w = _layer(4)
    w["w1"][2, 0, 0] = float("inf")
    store = ExpertStore(str(tmp_path / "s"), budget=0.5, quantize="int8")
    with pytest.raises(ValueError, match="non-finite expert weights in \\['w1'\\]"):
        store.add_layer("L", w, transposed=False)


def test_int8_offloaded_model_is_close_to_resident_and_fits_more(tmp_path):
    """int8 copies change the results (which is why they are off by default) but stay close, and a
    quarter budget then holds most experts: later steps load less than without them."""
    ids = [torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    ref = _resident(MODEL, ids)
    torch._dynamo.reset()
    _, exact, plain = _offloaded(MODEL, ids, tmp_path / "plain", budget=0.25, policy="lru", prefetch=False)
    torch._dynamo.reset()
    _, outs, store = _offloaded(MODEL, ids, tmp_path / "int8", budget=0.25, policy="lru", quantize="int8")
    assert all(torch.equal(a, b) for a, b in zip(exact, ref))  # quantize off: bit-equal
    assert not all(torch.equal(a, b) for a, b in zip(outs, ref))
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, atol=0.05 * float(b.abs().max()), rtol=0)
    assert store.peak_bytes <= store.budget == plain.budget
    assert store.stats()["hit_rate"] > plain.stats()["hit_rate"]
    assert len(store.resident()) > len(plain.resident())


def test_loader_process_reads_in_flight_free_room_for_a_demand_load(tmp_path):
    """The whole budget taken by prefetches still being read in the loader process: a layer's own load
    waits for them to land (the caller collects them; no thread publishes them), then evicts one."""
    layer = _layer(6)
    store = _store(tmp_path, [layer], budget=2 / 6, policy="lru", loader="process")
    assert store.prefetch(0, [0, 1, 2]) == [0, 1]  # the budget holds two
    with store.use(0, 4) as w:
        assert torch.equal(w["w1"], layer["w1"][4])
    assert store.cached_bytes() <= store.budget
    store.close()


def test_readahead_entries_are_read_by_their_first_use_and_evictable_until_then(tmp_path):
    """loader "readahead": a prefetch only starts the kernel's read; the entry counts against the budget
    but holds nothing until a use reads it, so a demand load evicts it instead of waiting for it, and
    drain() reads whatever is still unclaimed."""
    layer = _layer(6)
    store = _store(tmp_path, [layer], budget=2 / 6, policy="lru", loader="readahead")
    assert store.prefetch(0, [0, 1, 2]) == [0, 1]
    assert store.stats()["bytes_loaded"] == 0 and store.resident() == []  # nothing read yet
    assert store.begin_step(0, [1]) == [1]  # a hit, in flight
    with store.use(0, 1) as w:
        assert torch.equal(w["w1"], layer["w1"][1])
    with store.use(0, 4) as w:  # the budget is full: the unclaimed readahead of 0 makes room
        assert torch.equal(w["w1"], layer["w1"][4])
    assert store.resident() == [(0, 1), (0, 4)] and store.cached_bytes() <= store.budget
    store.prefetch(0, [5])
    store.drain()
    assert (0, 5) in store.resident() and store._thread is None  # no loader thread was started
    assert store.stats()["bytes_loaded"] == 3 * store.layers[0].expert_bytes
    store.close()


@pytest.mark.parametrize("loader", LOADERS)
def test_a_miss_left_for_its_caller_never_blocks_other_loads(tmp_path, loader):
    """A decode-sized step reads its first miss itself (no loader is given it). If that step never
    reaches the expert, the entry is still evictable: a later demand load takes its room instead of
    waiting for a read nobody will do, and a later prefetch gives it to a loader. The pins a step took
    with pin_loaded are released by unpin."""
    layer = _layer(6)
    store = _store(tmp_path, [layer], budget=1 / 6, policy="lru", loader=loader)
    assert store.begin_step(0, [2], rows=1) == [2]
    assert not store._entries[(0, 2)].handed and not store._entries[(0, 2)].started
    with store.use(0, 3) as w:  # the budget holds one expert: the unclaimed 2 makes room
        assert torch.equal(w["w1"], layer["w1"][3])
    assert store.resident() == [(0, 3)] and store.cached_bytes() <= store.budget
    assert store.pin_loaded(0, [3, 4]) is None  # 4 is not loaded: nothing pinned
    loaded = store.pin_loaded(0, [3])
    assert torch.equal(loaded[3]["w2"], layer["w2"][3]) and store._entries[(0, 3)].pins == 1
    store.unpin(0, [3])
    assert store._entries[(0, 3)].pins == 0
    with store.use(0, 5) as w:  # 3 unpinned: evictable again, so 5 takes its room
        assert torch.equal(w["w1"], layer["w1"][5])
    assert store.resident() == [(0, 5)]
    store.begin_step(0, [1], rows=1)  # left for the caller again; a prefetch of it gives it to a loader
    assert store.prefetch(0, [1]) == [1] and (store._entries[(0, 1)].handed or loader == "readahead")
    store.drain()
    assert store.resident() == [(0, 1)] and store.cached_bytes() <= store.budget
    store.close()


@given(tokens=st.integers(0, 40), experts=st.integers(2, 12), k=st.integers(1, 3), bias=st.booleans(),
       func=st.sampled_from(["softmax", "sigmoid"]), nan_rows=st.integers(0, 2), seed=st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_prediction_ranks_small_steps_in_python_as_topk_does(tokens, experts, k, bias, func, nan_rows, seed):
    """Decode-sized steps are ranked in Python, larger ones with topk/bincount: the same experts, the
    same votes (continuous random logits have no ties; NaN scores rank last)."""
    from moe_compiler.codegen import offload_ops
    from moe_compiler.ir import ExpertSpec, MoESpec, RouterSpec

    k = min(k, experts)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    if not (bias and func == "softmax"):  # (a softmax row with a NaN is all NaN: every expert ties)
        logits[:nan_rows, 0] = float("nan")
    score_bias = torch.randn(experts, generator=g) if bias else None
    spec = MoESpec(RouterSpec(experts, k, score_func=func), ExpertSpec(4, 4))
    small = offload_ops.predict(logits, score_bias, spec)
    saved = offload_ops._SMALL_STEP
    offload_ops._SMALL_STEP = -1
    try:
        large = offload_ops.predict(logits, score_bias, spec)
    finally:
        offload_ops._SMALL_STEP = saved
    assert torch.equal(small[0], large[0]) and small[1] == large[1] and small[2] == large[2]
    assert small[0].shape == (tokens, offload_ops.predicted_per_token(spec))
    assert offload_ops.used_experts(small[0]) == torch.unique(small[0]).tolist()


@pytest.mark.parametrize("threads_below_cores", [False, True])
def test_loader_thread_start_notes_cores_taken_by_intra_op_threads(tmp_path, caplog, monkeypatch, threads_below_cores):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    torch.set_num_threads(3 if threads_below_cores else 4)
    store = ExpertStore(str(tmp_path))
    try:
        with caplog.at_level("INFO", logger="moe_compiler.runtime.expert_store"):
            store._ensure_thread()
    finally:
        store.close()
        torch.set_num_threads(before)
    noted = [r.getMessage() for r in caplog.records if "intra-op threads" in r.getMessage()]
    if threads_below_cores:
        assert noted == []
    else:
        assert len(noted) == 1 and "torch.set_num_threads(3)" in noted[0], noted


@pytest.mark.parametrize("loader", ["thread", "readahead"])
def test_loads_the_layer_reads_itself_are_counted(tmp_path, loader):
    """A load no loader has started when the layer needs it is read by the layer's own thread and
    counted (read_by_caller; prefetches_read_by_caller when a prediction issued it); a load a loader
    read is not. Readahead gives no loader the read: the caller reads every prefetch it uses."""
    layer = _layer(6)
    store = _store(tmp_path, [layer], budget=1.0, policy="lru", loader=loader)
    gate = threading.Event()
    read = store._read_raw

    def held_read(key):   # the loader thread's reads wait for the gate
        if threading.current_thread() is not threading.main_thread():
            assert gate.wait(10)
        return read(key)

    store._read_raw = held_read
    assert store.prefetch(0, [1, 2]) == [1, 2]
    if loader == "thread":   # the loader holds expert 1; expert 2 waits in its queue
        deadline = time.monotonic() + 10
        while not store._entries[(0, 1)].started and time.monotonic() < deadline:
            time.sleep(0.001)
        assert store._entries[(0, 1)].started
    for e in (2, 3):   # 2: a queued prefetch the layer reads itself; 3: a miss
        with store.use(0, e) as w:
            assert torch.equal(w["w1"], layer["w1"][e])
    gate.set()
    with store.use(0, 1) as w:   # the loader's read (thread) or the caller's (readahead)
        assert torch.equal(w["w1"], layer["w1"][1])
    s = store.stats()
    by_loader = loader == "thread"
    assert (s["read_by_caller"], s["prefetches_read_by_caller"]) == ((2, 1) if by_loader else (3, 2))
    assert s["layers"][0]["read_by_caller"] == s["read_by_caller"]
    store.close()
