"""Tiered expert store: a budgeted fast tier, an optional host tier, and per-expert files on disk.

    fast tier    the memory experts are computed from: GPU memory, or on a CPU-only machine a RAM
                 budget standing for it (``budget`` bytes; a cache policy picks what to evict)
    host tier    optional (``host_budget`` bytes, LRU): raw copies kept in host memory, so a miss in
                 the fast tier need not go to disk (pinned memory on GPU machines)
    disk         runtime.expert_files: one checked safetensors file per expert

Loads are asynchronous (demand loads, then prefetches nearest prediction first). ``loader="thread"``:
two background threads in a pipeline: one reads and checks expert files, the other prepares what
was read (oneDNN packing on CPU; on CUDA the copy to the device on a side stream), so the disk reads
the next expert while the CPU prepares the last.
``loader="process"`` (CPU layers; CUDA layers keep the thread): a child process reads and checks the
files into shared staging slots (runtime.loader_process), so reads cost the model thread no GIL
time; the model thread collects finished reads whenever it calls the store, and hands the child at
most PROCESS_PREFETCHES_AHEAD prefetches at once, so a step can still drop the ones it does not use.
``loader="readahead"`` (CPU layers; CUDA layers keep the thread): no loader at all; a load only asks
the kernel to read the file into the page cache in the background (posix_fadvise WILLNEED) and the
layer that uses the expert copies it in from there (its first use claims it), so loading costs the
model thread no GIL hand-offs, only a short read from memory.

``quantize="int8"``: the fast tier holds int8 copies of the expert weight matrices (runtime.quantize;
changes results, so off by default) and is charged their bytes; ``use`` yields dequantized tensors.

A layer pins each expert while it computes with it, so an expert in use is never evicted, and the
fast tier never holds more than its budget (loads in flight count against it). Every number explain() and bench/offload.py report
comes from ``stats()``.

    store = ExpertStore(root, budget=0.5, policy="lru", loader="thread")
    layer = store.add_layer("model.layers.0.mlp", {"w1": [E, N1, H], "w2": [E, H, I]}, transposed=False)
    store.prefetch(layer, [3, 5])            # asynchronous; returns the experts it could issue
    with store.use(layer, e) as w:           # waits for the load (a miss loads on demand)
        w["w1"], w["w2"] ...                 # that expert's tensors ("packed:<name>" instead when prepacked)
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moe_compiler.runtime.cache_policy import CachePolicy, make_policy
from moe_compiler.runtime.expert_files import ExpertFiles, ExpertReadError
from moe_compiler.runtime.loader_process import LoaderProcessError, ProcessLoader, staging_slots
from moe_compiler.runtime.memory import return_freed_memory
from moe_compiler.runtime.quantize import MODES as QUANTIZE_MODES
from moe_compiler.runtime.quantize import dequantize_rows, int8_bytes, quantizable, quantize_rows

log = logging.getLogger(__name__)

# loader queue priorities (lower first): demand loads, then prefetches, nearest layer first
# (a prediction ``ahead`` further sources back gets priority _PREFETCH + ahead)
_DEMAND, _PREFETCH = 0, 1
# Handing a read to the loader thread and waking up for it costs more than the GEMMs of a few dozen
# rows take, so decode-sized steps read their first miss themselves. Measured on the reference model's
# layer (2 cores, 1 intra-op thread, page cache dropped): a 1-token step with one hit and one miss
# took ~0.60 ms reading the miss itself against ~0.73 ms handing it to the loader thread.
HANDOFF_MIN_ROWS = 64
# prefetches the loader process holds at once (demand loads may add to them): the rest wait in the
# store's queue, where a step that does not use them can still drop them (a request the child holds
# is read whatever happens). One, as the loader thread reads: on the wide reference model's decode,
# 1 read 134 MiB per repetition, 2 read 162 and 16 (every staging slot) 166 (BENCHMARKS.md)
PROCESS_PREFETCHES_AHEAD = 1
LOADERS = ("thread", "process", "readahead")


@dataclass
class LayerStats:
    """Counters of one MoE layer (hits/misses count experts a step actually used)."""

    name: str
    steps: int = 0
    hits: int = 0              # used experts that were resident or already being prefetched
    ready: int = 0             # of the hits, experts already loaded when the layer began (no wait)
    misses: int = 0            # used experts loaded on demand
    prefetched: int = 0        # loads issued by the predictor
    prefetch_used: int = 0     # of those, experts the layer then used
    predicted: int = 0         # used experts that were in the predicted set (for recall)
    predicted_steps_used: int = 0  # used experts over the steps that had a prediction
    token_hits: int = 0        # (token, expert) routings inside that token's predicted top-(k+1)
    token_total: int = 0
    bytes_loaded: int = 0
    stall_s: float = 0.0       # time the layer waited for loads
    read_by_caller: int = 0    # loads the layer's own thread read (no loader had started them)
    # of those, predicted experts: with the loader thread or process, a prefetch issued too late for a
    # loader to start it before the layer needed it (with readahead, every prefetch the layer used)
    prefetches_read_by_caller: int = 0

    def as_dict(self) -> dict:
        used = self.hits + self.misses
        return {"name": self.name, "steps": self.steps, "hits": self.hits, "ready": self.ready, "misses": self.misses,
                "hit_rate": self.hits / used if used else None,
                "ready_rate": self.ready / used if used else None,
                "prediction_recall": self.predicted / self.predicted_steps_used if self.predicted_steps_used else None,
                "token_recall": self.token_hits / self.token_total if self.token_total else None,
                "prefetched": self.prefetched, "prefetch_used": self.prefetch_used,
                "bytes_loaded": self.bytes_loaded, "stall_s": self.stall_s,
                "read_by_caller": self.read_by_caller, "prefetches_read_by_caller": self.prefetches_read_by_caller}


@dataclass
class Layer:
    index: int
    name: str
    folder: str
    manifest: dict
    transposed: bool
    prepack: tuple            # names of weights to keep in oneDNN's packed layout (CPU)
    device: torch.device
    dtype: torch.dtype
    stats: LayerStats = None
    file_bytes: int = 0       # the largest expert file (safetensors header included)
    quantized: tuple = ()     # names of weights the fast tier holds as int8 (option quantize)

    @property
    def expert_bytes(self) -> int:
        """Bytes of the largest expert at full precision (what fractional budgets are fractions of)."""
        return max(self.manifest["bytes"]) if self.manifest["bytes"] else 0

    @property
    def cached_bytes(self) -> int:
        """Bytes one expert takes in the fast tier (less than expert_bytes when quantized)."""
        if not self.quantized:
            return self.expert_bytes
        size = self.dtype.itemsize
        return sum(int8_bytes(self.manifest["shapes"][n], size) if n in self.quantized
                   else torch.Size(self.manifest["shapes"][n]).numel() * size for n in self.manifest["names"])

    @property
    def num_experts(self) -> int:
        return self.manifest["num_experts"]


@dataclass
class _Entry:
    nbytes: int
    ready: threading.Event = field(default_factory=threading.Event)
    tensors: dict = None
    error: BaseException = None
    pins: int = 0
    done: bool = False        # ready.is_set(), as a plain field read under the store's lock (hot loops)
    started: bool = False
    handed: bool = False      # given to the loader thread's queue or the loader process (else a caller reads it)
    by_prefetch: bool = False  # issued by a prediction and not yet used by a step
    predicted: bool = False    # issued by a prediction (kept after a step uses it)
    priority: int = 0         # the loader queue priority it was last handed with (_DEMAND, _PREFETCH + ahead)


def _routed_in_prediction(ids: torch.Tensor, per_token: torch.Tensor) -> int:
    """(token, expert) routings in ids [T, k] that the token's own prediction per_token [T, p] holds."""
    if ids.numel() <= 64:  # decode-sized steps: a few Python comparisons beat four tensor ops
        return sum(e in pred for row, pred in zip(ids.tolist(), per_token.tolist()) for e in row)
    return int((ids.unsqueeze(-1) == per_token.unsqueeze(1)).any(-1).sum())


def parse_bytes(value) -> int | float:
    """'2GB' / '512MiB' / 123456 -> bytes (int); a float in (0, 1] stays a fraction of the experts' bytes."""
    if isinstance(value, bool):
        raise ValueError(f"a budget must be bytes or a fraction in (0, 1], got {value!r}")
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(f"a fractional budget must be in (0, 1], got {value!r}")
        return value
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a budget in bytes must be >= 0, got {value!r}")
        return value
    if isinstance(value, str):
        text = value.strip().upper().replace(" ", "")
        units = {"TIB": 2 ** 40, "GIB": 2 ** 30, "MIB": 2 ** 20, "KIB": 2 ** 10, "TB": 10 ** 12, "GB": 10 ** 9,
                 "MB": 10 ** 6, "KB": 10 ** 3, "B": 1}
        for unit, mult in units.items():
            if text.endswith(unit):
                try:
                    return int(float(text[: -len(unit)]) * mult)
                except ValueError:
                    break
        try:
            return parse_bytes(float(text)) if "." in text else int(text)
        except ValueError:
            pass
    raise ValueError(f"cannot read {value!r} as a budget: give bytes (int, or '2GB', '512MiB') "
                     "or a fraction of the experts' bytes in (0, 1]")


class ExpertStore:
    """See the module docstring. Thread-safe; one loader thread per store."""

    def __init__(self, root: str, *, budget=1.0, policy: str | CachePolicy = "lru", host_budget=0,
                 drop_page_cache: bool = True, policy_options: dict | None = None, loader: str = "thread",
                 quantize: str | None = None):
        if loader not in LOADERS:
            raise ValueError(f"loader must be one of {list(LOADERS)}, got {loader!r}")
        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
        self.quantize = quantize
        self.loader = loader
        self._proc: ProcessLoader | None = None   # loader "process": the child reading CPU layers' experts
        self._unsent: list = []                    # loader "process": keys waiting for a slot or their turn
        self.drop_page_cache = drop_page_cache
        # the readahead loader copies in what the kernel read ahead into the page cache: no O_DIRECT
        self.files = ExpertFiles(root, drop_page_cache=drop_page_cache, direct_io=loader != "readahead")
        self.root = root
        self._budget_spec = parse_bytes(budget)
        self._host_budget_spec = parse_bytes(host_budget)
        self.policy = make_policy(policy, **(policy_options or {})) if isinstance(policy, str) else policy
        self.layers: list[Layer] = []
        self._by_name: dict = {}
        self._entries: dict = {}          # (layer, expert) -> _Entry (fast tier, loading or ready)
        self._host: OrderedDict = OrderedDict()  # (layer, expert) -> raw tensors (host tier, LRU)
        self._host_bytes = 0
        self._used = 0
        self.peak_bytes = 0
        self._lock = threading.Condition()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = None
        self._preparer = None
        self._predicted: dict = {}        # layer -> (set of predicted experts, per-token predictions or None)
        self._last_used: dict = {}        # layer -> experts its latest step used
        self._recently_used: set = set()  # _last_used as (layer, expert) keys: what prefetches may not evict
        self.budget = 0
        self.host_budget = 0

    # ------------------------------------------------------------------ layers and budget
    def add_layer(self, name: str, stacked: dict, *, transposed: bool, prepack=(), source=None) -> int:
        """Register a layer, writing its experts to disk; returns its index.

        stacked: weight name -> [E, ...] tensor. ``source`` (the module's weight tensor) identifies the
        layer across compilations: the same name and the same live source tensor reuse the layer
        (a recompilation for new shapes); anything else gets a layer of its own, so a store never
        serves one model's experts to another. The disk copy is a snapshot taken now.
        """
        with self._lock:
            for ref, index in self._by_name.get(name, []):
                if source is not None and ref is not None and ref() is source:
                    return index
            generation = len(self._by_name.get(name, []))
        quantized = ()
        if self.quantize == "int8":
            quantized = tuple(n for n, t in stacked.items() if t.is_floating_point() and quantizable(t.shape[1:]))
            bad = [n for n in quantized if not bool(torch.isfinite(stacked[n]).all())]
            if bad:
                raise ValueError(f"offload quantize 'int8': layer {name!r} has non-finite expert weights in {bad}, "
                                 "which int8 copies cannot represent; offload it with quantize None")
            prepack = ()  # the GEMMs read dequantized copies, never oneDNN-packed ones
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "layer"
        folder = base if generation == 0 else f"{base}.{generation}"
        self.files.write_layer(folder, stacked)
        manifest = self.files.manifest(folder)
        file_bytes = max((os.path.getsize(self.files.path(folder, e)) for e in range(manifest["num_experts"])),
                         default=0)
        any_w = next(iter(stacked.values()))
        with self._lock:
            index = len(self.layers)
            layer = Layer(index, name, folder, manifest, transposed, tuple(prepack), any_w.device, any_w.dtype,
                          LayerStats(name), file_bytes, quantized)
            self.layers.append(layer)
            self._by_name.setdefault(name, []).append((weakref.ref(source) if source is not None else None, index))
            self._resize()
        return index

    def _budgets(self, layers) -> tuple[int, int]:
        total = sum(layer.expert_bytes * layer.num_experts for layer in layers)
        spec, hspec = self._budget_spec, self._host_budget_spec
        return (int(spec * total) if isinstance(spec, float) else spec,
                int(hspec * total) if isinstance(hspec, float) else hspec)

    def check_budget(self, layers=None):
        """Raise ValueError when the budget cannot hold the largest expert (call once the layers are in:
        a fractional budget grows as layers join)."""
        layers = self.layers if layers is None else layers
        budget, _ = self._budgets(layers)
        biggest = max((layer.cached_bytes for layer in layers), default=0)
        if layers and budget < biggest:
            total = sum(layer.expert_bytes * layer.num_experts for layer in layers)
            raise ValueError(f"offload budget {budget} bytes is smaller than one expert ({biggest} bytes); "
                             f"the budget must hold at least the largest expert (experts total {total} bytes)")

    def _resize(self):
        self.budget, self.host_budget = self._budgets(self.layers)
        self.policy.setup([layer.cached_bytes for layer in self.layers],
                          [layer.num_experts for layer in self.layers], self.budget)

    @property
    def total_expert_bytes(self) -> int:
        return sum(layer.expert_bytes * layer.num_experts for layer in self.layers)

    # ------------------------------------------------------------------ loading
    def _ensure_thread(self):
        if self._thread is None or not self._thread.is_alive():
            cores = os.cpu_count() or 1
            if cores > 1 and torch.get_num_threads() >= cores:
                # on 2 cores, one intra-op thread took a prefetching variant of bench/offload.py from
                # 1.29x to 1.45x on-demand speed: background reads stop preempting OpenMP workers
                log.info("expert loader thread starts while torch uses %d intra-op threads on %d cores: "
                         "its reads compete with the model's threads; torch.set_num_threads(%d) leaves it a core",
                         torch.get_num_threads(), cores, cores - 1)
            # a queue of one between the stages: at most one read expert waits for the preparer
            handoff = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._loader, args=(handoff,), name="moe-expert-loader",
                                            daemon=True)
            self._preparer = threading.Thread(target=self._prepare_loop, args=(handoff,),
                                              name="moe-expert-preparer", daemon=True)
            self._thread.start()
            self._preparer.start()

    def _loader(self, handoff):
        """The loader thread: claim queued loads and read them; the raw tensors go to the preparer
        thread, so the disk reads the next file while the preparer packs this one."""
        while True:
            _, _, key = self._queue.get()
            if key is None:  # close()
                handoff.put(None)
                return
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or entry.started:
                    continue
                entry.started = True
            try:
                raw, error = self._read_raw(key), None
            except BaseException as e:  # surfaced to whoever waits for the expert
                raw, error = None, e
            handoff.put((key, entry, raw, error))

    def _prepare_loop(self, handoff):
        """The preparer thread: raw tensors from the loader thread -> compute-ready copies, published."""
        while True:
            item = handoff.get()
            if item is None:
                return
            key, entry, raw, error = item
            tensors = None
            if error is None:
                try:
                    tensors = self._prepare(self.layers[key[0]], raw)
                except BaseException as e:  # surfaced to whoever waits for the expert
                    error = e
            self._publish(key, entry, tensors, error)

    def _load(self, key, entry):
        """Read and prepare one claimed entry (entry.started set by the caller), then publish it."""
        try:
            tensors = self._prepare(self.layers[key[0]], self._read_raw(key))
        except BaseException as e:  # surfaced to whoever waits for the expert
            tensors, error = None, e
        else:
            error = None
        self._publish(key, entry, tensors, error)

    def _publish(self, key, entry, tensors, error):
        with self._lock:
            entry.tensors, entry.error = tensors, error
            if error is None:
                self.layers[key[0]].stats.bytes_loaded += entry.nbytes
            entry.done = True
            entry.ready.set()
            self._lock.notify_all()

    def _read_raw(self, key) -> dict:
        """The expert's raw tensors: from the host tier, else read from its file (and admitted)."""
        layer = self.layers[key[0]]
        with self._lock:
            raw = self._host.get(key)
            if raw is not None:
                self._host.move_to_end(key)
        if raw is None:
            raw = self.files.read_expert(layer.folder, key[1], layer.manifest)
            self._host_admit(key, raw, layer.manifest["bytes"][key[1]])
        return raw

    def _host_admit(self, key, raw, nbytes):
        if self.host_budget <= 0 or nbytes > self.host_budget:
            return
        with self._lock:
            while self._host and self._host_bytes + nbytes > self.host_budget:
                old, tensors = self._host.popitem(last=False)
                self._host_bytes -= sum(t.numel() * t.element_size() for t in tensors.values())
            self._host[key] = raw
            self._host_bytes += nbytes

    def _prepare(self, layer: Layer, raw: dict) -> dict:
        """Raw CPU tensors -> compute-ready copies (int8 where the layer is quantized, on the device, and
        oneDNN-packed where the layer asks)."""
        if layer.quantized:
            raw = {k: v for n, t in raw.items()
                   for k, v in (zip(("int8:" + n, "scale:" + n), quantize_rows(t)) if n in layer.quantized
                                else ((n, t),))}
        out = {}
        if layer.device.type == "cuda":
            stream = self._cuda_stream(layer.device)
            with torch.cuda.stream(stream):
                for n, t in raw.items():
                    out[n] = t.pin_memory().to(layer.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            done.synchronize()
            return out
        for n, t in raw.items():
            if n in layer.prepack:  # only the packed copy is kept: the GEMMs read nothing else
                from moe_compiler.codegen.torch_experts import PackedWeights

                out["packed:" + n] = PackedWeights.pack_one(t, layer.transposed)
            else:
                out[n] = t
        return out

    def _cuda_stream(self, device):
        if not hasattr(self, "_streams"):
            self._streams = {}
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _make_room(self, key, nbytes, protect, wait: bool, demand: bool = True) -> bool:
        """Evict (policy order, unpinned and ready only; for a demand load also entries no loader was
        given and nobody has claimed: readaheads, a decode step's first miss) until nbytes fit; caller
        holds the lock."""
        def evictable(k):  # loaded and unpinned, or (demand) a load no loader was given and nobody claimed
            en = self._entries.get(k)
            return (en is not None and not en.pins and k not in protect and k != key
                    and (en.done or (demand and not en.started and not en.handed)))

        while True:
            if self._used + nbytes <= self.budget:
                return True
            # the policy's ranking, then (defensively) any entry it does not hold
            for victim in itertools.chain(self.policy.order(key), list(self._entries)):
                if not evictable(victim):
                    continue
                self._evict(victim)
                if self._used + nbytes <= self.budget:
                    return True
            if not wait:
                return False
            # room comes back only from a load that finishes (an unclaimed entry was evictable) or a pin
            if not any((not en.done and (en.started or en.handed)) or en.pins for en in self._entries.values()):
                raise RuntimeError(f"offload budget {self.budget} bytes cannot hold expert {key} ({nbytes} bytes)")
            if self._unsent or (self._proc is not None and self._proc.in_flight()):
                self._collect(timeout=0.05)  # the loader process's reads are published by its callers only
            else:
                self._lock.wait(timeout=1.0)

    def _evict(self, key):
        entry = self._entries.pop(key)
        self._used -= entry.nbytes
        self.policy.on_evict(key)

    def _drop_unstarted(self, key) -> None:
        """Forget a queued load nobody has claimed or pinned (its room is freed; a later use loads it)."""
        entry = self._entries.get(key)
        if entry is not None and not entry.started and not entry.pins:
            self._evict(key)

    def _issue(self, key, priority, protect=(), wait=False, send=True) -> bool:
        """Start loading key unless it is cached or loading; caller holds the lock. ``send=False`` leaves
        a new entry for the caller to claim and read itself (no loader is given it)."""
        entry = self._entries.get(key)
        by_process = self._by_process(key[0])
        if entry is not None:
            if priority < entry.priority and not entry.started and entry.handed:
                # a queued load is needed sooner (a demand, or a nearer prediction): move it up the queue
                # (the loader skips the stale queue item: the entry is started by then)
                entry.priority = priority
                if by_process:
                    self._unsent = [(priority if k == key else p, n, k) for p, n, k in self._unsent]
                else:
                    self._queue.put((priority, next(self._seq), key))
            elif send and not entry.started and not entry.handed and not self._by_readahead(key[0]):
                self._hand(key, entry, priority)  # left for a caller who has not come: a loader reads it
            return True
        layer = self.layers[key[0]]
        nbytes = layer.cached_bytes if layer.quantized else layer.manifest["bytes"][key[1]]
        if not self._make_room(key, nbytes, protect, wait, demand=priority == _DEMAND):
            return False
        predicted = priority >= _PREFETCH
        entry = self._entries[key] = _Entry(nbytes, by_prefetch=predicted, predicted=predicted)
        self._used += nbytes
        self.peak_bytes = max(self.peak_bytes, self._used)
        self.policy.on_insert(key)
        if self._by_readahead(key[0]):
            if send and key not in self._host:  # (nothing to gain for a load read at once or from host memory)
                self.files.readahead(layer.folder, key[1])  # the first use claims and reads it
        elif by_process and key in self._host:  # a copy in host memory: no read to hand off
            entry.started = True
            self._load(key, entry)
        elif send:
            self._hand(key, entry, priority)
        return True

    def _hand(self, key, entry, priority) -> None:
        """Give an unclaimed entry to the loader process (CPU layers with loader "process") or the
        loader thread; caller holds the lock."""
        entry.handed, entry.priority = True, priority
        if not self._by_process(key[0]):
            self._ensure_thread()
            self._queue.put((priority, next(self._seq), key))
        elif not self._send(key, priority):
            self._unsent.append((priority, next(self._seq), key))

    # ------------------------------------------------------------------ the loader process (CPU layers)
    def _by_process(self, layer: int) -> bool:
        return self.loader == "process" and self.layers[layer].device.type == "cpu"

    def _by_readahead(self, layer: int) -> bool:
        return self.loader == "readahead" and self.layers[layer].device.type == "cpu"

    def _send(self, key, priority) -> bool:
        """Hand an unclaimed entry to the loader process (started, lazily); False when no staging slot
        is free, when a prefetch would go beyond PROCESS_PREFETCHES_AHEAD requests in flight, or when
        the slots must grow for this layer's files while reads are in flight. Caller holds the lock."""
        layer = self.layers[key[0]]
        if priority >= _PREFETCH and self._proc is not None and self._proc.in_flight() >= PROCESS_PREFETCHES_AHEAD:
            return False
        if self._proc is not None and layer.file_bytes > self._proc.slot_bytes:
            if self._proc.in_flight():
                return False
            self._proc.close()
            self._proc = None
        if self._proc is None:
            slot_bytes = max(lay.file_bytes for lay in self.layers)
            self._proc = ProcessLoader(slot_bytes, staging_slots(slot_bytes), self.drop_page_cache)
        try:
            sent = self._proc.submit(key, self.files.path(layer.folder, key[1]), layer.manifest["xxh3_64"][key[1]],
                                     priority)
        except LoaderProcessError as e:
            self._abandon_process(e)
            raise
        if not sent:
            return False
        self._entries[key].started = True
        return True

    def _collect(self, timeout: float = 0.0) -> None:
        """Publish the loader process's finished reads (waiting up to timeout s for one when none has
        finished) and send waiting keys to the slots they freed. Caller holds the lock."""
        self._send_unsent()   # (a demand load moved up in the queue need not wait for a read to finish)
        proc = self._proc
        if proc is not None and proc.in_flight():
            try:
                finished = proc.poll(timeout)
            except LoaderProcessError as e:
                self._abandon_process(e)
                raise
            for key, slot, size, problem in finished:
                layer = self.layers[key[0]]
                path = self.files.path(layer.folder, key[1])
                tensors = error = None
                try:
                    if problem is not None:
                        raise ExpertReadError(f"cannot read expert {key[1]} of layer {layer.folder!r} from {path}: "
                                              f"the file {problem}")
                    try:
                        raw = self.files.tensors_from_file_bytes(layer.folder, key[1], layer.manifest,
                                                                 proc.slot(slot)[:size])
                    finally:
                        proc.release(slot)
                    self._host_admit(key, raw, layer.manifest["bytes"][key[1]])
                    tensors = self._prepare(layer, raw)
                except BaseException as e:  # surfaced to whoever waits for the expert
                    error = e
                self._publish(key, self._entries[key], tensors, error)
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send waiting keys, best priority first, while the loader process takes them."""
        if self._unsent:
            self._unsent.sort()
            while self._unsent:
                _, _, key = self._unsent[0]
                entry = self._entries.get(key)
                if entry is not None and not entry.started and not self._send(key, self._unsent[0][0]):
                    break
                self._unsent.pop(0)

    def _abandon_process(self, error) -> None:
        """Close the loader process; its reads in flight fail with ``error`` (anyone waiting raises) and
        leave the fast tier, so later uses read them again (a later send starts a new process).
        Caller holds the lock."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        keys = proc.in_flight_keys()
        proc.close()
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                self._evict(key)
                entry.error, entry.done = error, True
                entry.ready.set()
        self._lock.notify_all()

    def _wait_loaded(self, entry, by_process: bool) -> None:
        """Block until entry is published (by the loader thread, the loader process or a caller)."""
        while not entry.done:
            if by_process and self._proc is not None and self._proc.in_flight():
                with self._lock:
                    if not entry.done:
                        self._collect(timeout=0.05)
            else:
                entry.ready.wait(0.05)

    # ------------------------------------------------------------------ the API layers use
    def prefetch(self, layer: int, experts, votes: dict | None = None, token_predictions=None,
                 ahead: int = 0) -> list:
        """Issue asynchronous loads of experts (best first) while the budget allows; returns those issued
        or already cached. Records the prediction for recall (votes: expert -> tokens predicting it).

        ``ahead``: how many predictions of this layer are still to come (prefetch_lookahead; 0 for the
        nearest source). Loads are queued nearest first: after every load of a nearer prediction. A
        prediction supersedes the layer's earlier one: the earlier one's experts it no longer holds
        are dropped while no loader has started them."""
        experts = [int(e) for e in experts]
        with self._lock:
            earlier, _ = self._predicted.get(layer, (None, None))
            self._predicted[layer] = (set(experts), token_predictions)
            if earlier:
                self._drop_unstarted_prefetches(layer, earlier.difference(experts))
            self._collect()   # (after the drop: a slot it frees goes to a load still wanted)
            if votes:
                self.policy.on_prediction(layer, votes)
            # a prefetch is a guess: it may not evict what any layer used in its latest step
            protect = self._recently_used
            taken = []
            for e in experts:
                fresh = (layer, e) not in self._entries
                if not self._issue((layer, e), _PREFETCH + ahead, protect=protect):
                    break
                taken.append(e)
                self.layers[layer].stats.prefetched += fresh
            return taken

    def _drop_unstarted_prefetches(self, layer: int, experts) -> None:
        """Forget prefetches of layer's ``experts`` that no step has used and no loader has started
        (their room comes back; caller holds the lock)."""
        for e in experts:
            entry = self._entries.get((layer, e))
            if entry is not None and entry.by_prefetch:
                self._drop_unstarted((layer, e))

    def begin_step(self, layer: int, experts, ids=None, rows: int | None = None) -> list:
        """A layer is about to use ``experts``: count hits/misses and recall, issue demand loads for the
        missing ones while they fit next to the resident ones, and return the order to compute in
        (ready first, then in flight, then the rest).

        ``rows``: the (token, expert) routings the step computes, when the caller knows them. A step of
        fewer than HANDOFF_MIN_ROWS reads its first miss itself even when some experts are ready: their
        GEMMs would end long before a read handed to the loader did."""
        experts = [int(e) for e in experts]
        with self._lock:
            predicted, per_token = self._predicted.pop(layer, (None, None))
            if predicted:
                # predicted experts this step does not use, whose loads no loader has started: reading
                # them now would only hold up the loads that are needed (a later prediction asks again)
                self._drop_unstarted_prefetches(layer, predicted.difference(experts))
            self._collect()   # (after the drop: a slot it frees goes to a load still wanted)
            st = self.layers[layer].stats
            st.steps += 1
            if predicted is not None:
                st.predicted_steps_used += len(experts)
                st.predicted += len(predicted.intersection(experts))
                if per_token is not None and ids is not None and per_token.shape[0] == ids.shape[0]:
                    st.token_hits += _routed_in_prediction(ids, per_token)
                    st.token_total += ids.numel()
            ready, flying, missing = [], [], []
            for e in experts:
                entry = self._entries.get((layer, e))
                if entry is None:
                    missing.append(e)
                    st.misses += 1
                    continue
                st.hits += 1
                if entry.by_prefetch:
                    st.prefetch_used += 1
                    entry.by_prefetch = False
                self.policy.on_access((layer, e))
                (ready if entry.done else flying).append(e)
                st.ready += entry.done
            self.policy.on_use(layer, experts)
            self._recently_used.difference_update((layer, e) for e in self._last_used.get(layer, ()))
            self._recently_used.update((layer, e) for e in experts)
            self._last_used[layer] = experts
            protect = {(layer, e) for e in experts}
            overlap = bool(ready or flying) and (rows is None or rows >= HANDOFF_MIN_ROWS)
            for i, e in enumerate(missing):
                # with little or nothing loaded to compute meanwhile, the first miss is read by the caller
                # itself (use() claims it): handing it to the loader would only add a wake-up
                send = overlap or i > 0
                if not self._issue((layer, e), _DEMAND, protect=protect, send=send):
                    break
        return ready + flying + missing

    def pin_loaded(self, layer: int, experts) -> dict | None:
        """Pin every expert of ``experts`` at once when all are loaded on the CPU (a decode step that
        hits in the fast tier: one lock round instead of one ``use`` each) and return expert -> its
        tensors; else pin nothing and return None. Release them with ``unpin``."""
        if self.layers[layer].device.type != "cpu":
            return None
        with self._lock:
            entries = [self._entries.get((layer, e)) for e in experts]
            if not all(en is not None and en.done and en.error is None for en in entries):
                return None
            for en in entries:
                en.pins += 1
        return {e: self._computable(self.layers[layer], en.tensors) for e, en in zip(experts, entries)}

    def unpin(self, layer: int, experts) -> None:
        """Release the pins ``pin_loaded`` took."""
        with self._lock:
            for e in experts:
                self._entries[(layer, e)].pins -= 1
            self._lock.notify_all()

    @contextmanager
    def use(self, layer: int, expert: int):
        """Pin one expert for the duration of the block and yield its tensors (loading it if needed)."""
        key = (layer, int(expert))
        with self._lock:  # the usual case, an expert loaded on the CPU: pin it and go
            entry = self._entries.get(key)
            ready = (entry is not None and entry.done and entry.error is None
                     and self.layers[layer].device.type == "cpu")
            if ready:
                entry.pins += 1
        if ready:
            try:
                yield self._computable(self.layers[layer], entry.tensors)
            finally:
                with self._lock:
                    entry.pins -= 1
                    self._lock.notify_all()
            return
        start = time.perf_counter()
        with self._lock:
            self._issue(key, _DEMAND, wait=True, send=False)
            entry = self._entries[key]
            entry.pins += 1
            claimed = not entry.started  # not picked up by the loader yet: load it here, without a hand-off
            entry.started = True
            if claimed:
                st = self.layers[layer].stats
                st.read_by_caller += 1
                st.prefetches_read_by_caller += entry.predicted
        waited = not entry.ready.is_set()
        try:
            if claimed:
                self._load(key, entry)
            self._wait_loaded(entry, self._by_process(layer))
            if waited:
                with self._lock:
                    self.layers[layer].stats.stall_s += time.perf_counter() - start
            if entry.error is not None:
                with self._lock:
                    if self._entries.get(key) is entry:  # a failed load leaves no entry: a later use retries
                        self._evict(key)
                if isinstance(entry.error, ExpertReadError):
                    raise ExpertReadError(str(entry.error)) from entry.error
                raise RuntimeError(f"loading expert {expert} of layer {self.layers[layer].name!r} failed: "
                                   f"{entry.error}") from entry.error
            device = self.layers[layer].device
            if device.type == "cuda":
                # the copies were allocated on the loader's side stream; without this the caching
                # allocator could hand an evicted expert's memory to the next load while kernels
                # queued on the compute stream still read it
                stream = torch.cuda.current_stream(device)
                for t in entry.tensors.values():
                    t.record_stream(stream)
            yield self._computable(self.layers[layer], entry.tensors)
        finally:
            with self._lock:
                entry.pins -= 1
                self._lock.notify_all()

    @staticmethod
    def _computable(layer: Layer, tensors: dict) -> dict:
        """The tensors a layer computes with: int8 copies dequantized to the layer's dtype."""
        if not layer.quantized:
            return tensors
        out = {n: t for n, t in tensors.items() if not n.startswith(("int8:", "scale:"))}
        for n in layer.quantized:
            out[n] = dequantize_rows(tensors["int8:" + n], tensors["scale:" + n], layer.dtype)
        return out

    # ------------------------------------------------------------------ reporting
    def resident(self) -> list:
        with self._lock:
            return sorted(k for k, en in self._entries.items() if en.done)

    def cached_bytes(self) -> int:
        with self._lock:
            return self._used

    def stats(self) -> dict:
        with self._lock:
            layers = [layer.stats.as_dict() for layer in self.layers]
        hits = sum(l["hits"] for l in layers)
        ready = sum(l["ready"] for l in layers)
        misses = sum(l["misses"] for l in layers)
        pred = sum(layer.stats.predicted for layer in self.layers)
        pred_n = sum(layer.stats.predicted_steps_used for layer in self.layers)
        tok = sum(layer.stats.token_hits for layer in self.layers)
        tok_n = sum(layer.stats.token_total for layer in self.layers)
        return {"policy": self.policy.name, "budget_bytes": self.budget, "host_budget_bytes": self.host_budget,
                "quantize": self.quantize,
                "hits": hits, "ready": ready, "misses": misses, "predicted": pred, "predicted_of": pred_n,
                "token_hits": tok,
                "token_total": tok_n, "prefetched": sum(l["prefetched"] for l in layers),
                "prefetch_used": sum(l["prefetch_used"] for l in layers),
                "expert_bytes_total": self.total_expert_bytes, "peak_bytes": self.peak_bytes,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
                "ready_rate": ready / (hits + misses) if hits + misses else None,
                "prediction_recall": pred / pred_n if pred_n else None,
                "token_recall": tok / tok_n if tok_n else None,
                "bytes_loaded": sum(l["bytes_loaded"] for l in layers),
                "stall_s": sum(l["stall_s"] for l in layers),
                "read_by_caller": sum(l["read_by_caller"] for l in layers),
                "prefetches_read_by_caller": sum(l["prefetches_read_by_caller"] for l in layers), "layers": layers}

    def clear(self) -> int:
        """Drop every cached expert that is neither pinned nor loading, and the host tier, and give the
        memory back to the OS; returns the fast-tier bytes freed (the files on disk stay)."""
        with self._lock:
            keys = [k for k, en in self._entries.items() if en.done and not en.pins]
            freed = sum(self._entries[k].nbytes for k in keys)
            for k in keys:
                self._evict(k)
            self._host.clear()
            self._host_bytes = 0
        return_freed_memory()
        return freed

    def reset_stats(self) -> None:
        with self._lock:
            for layer in self.layers:
                layer.stats = LayerStats(layer.name)
            self.peak_bytes = self._used

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loader thread after the load it is doing, and the loader process after the reads
        it has taken; loads queued but not started are dropped (their room is freed; a later use loads
        them again, and a later load starts a new thread or process).

        Call it while no layer runs. Called for every store at interpreter exit: a daemon thread
        stopped in the middle of a read would otherwise abort the process ("terminate called without
        an active exception")."""
        self._close_process(timeout)
        thread, preparer = self._thread, self._preparer
        if thread is None or not thread.is_alive():
            return
        with self._lock:
            while True:
                try:
                    _, _, key = self._queue.get_nowait()
                except queue.Empty:
                    break
                self._drop_unstarted(key)
            self._queue.put((_DEMAND, next(self._seq), None))
        thread.join(timeout)
        if preparer is not None:
            preparer.join(timeout)

    def _close_process(self, timeout: float) -> None:
        with self._lock:
            for _, _, key in self._unsent:
                self._drop_unstarted(key)
            self._unsent.clear()
            deadline = time.monotonic() + timeout
            try:
                while self._proc is not None and self._proc.in_flight() and time.monotonic() < deadline:
                    self._collect(timeout=0.05)
            except LoaderProcessError:
                return  # the process had exited: _collect closed it and dropped its reads
            self._abandon_process(LoaderProcessError("the store was closed with this read in flight"))

    def drain(self) -> None:
        """Wait for every load in flight (used before measuring or shutting down)."""
        while True:
            with self._lock:
                self._collect()
                pending = [(key, en) for key, en in self._entries.items() if not en.done]
                claimed = bool(pending) and not pending[0][1].started  # nobody has started it: read it here
                if claimed:
                    pending[0][1].started = True
            if not pending:
                return
            key, entry = pending[0]
            if claimed:
                self._load(key, entry)
            self._wait_loaded(entry, self._by_process(key[0]))
