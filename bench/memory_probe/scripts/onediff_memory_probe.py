"""Bench-only webui extension (not part of the product): ``GET /onediff-bench/memory`` says what holds GPU memory.

``bench/webui_start.py`` links it into the webui it starts; ``bench/webui_soak.py`` reads it after every request. In
GiB: torch's allocated and reserved memory, each split into CUDA-graph private pools (every pool but the default
``(0, 0)``, from ``torch.cuda.memory_snapshot()``'s segments) and the default pool; the CUDA-graph tree managers alive
(found with ``gc``, so those of every thread: Inductor keeps one per thread and device) with their recordings alive
(nodes of ``roots``/``children``); the ``UNetModel``
objects alive, and how many of them are on the meta device (webui moves a model it replaces there); the objects gc
tracks and the seconds that pass over them took (most of the probe's 0.2 s in a tiny CPU webui). Nothing here
collects garbage or frees memory. Each part is guarded: a torch internals change makes its fields null, never a failed
request; without CUDA the memory fields are null.

``graph events``: what the CUDA-graph trees did since the last probe, from the debug messages torch writes on its
"cudagraphs" log (turned on here, kept off the console): graphs recorded, recordings passed over (one made for other
inputs, e.g. another model's weights, did not match; torch words this "Re-recording", but it records only where no
recording matches, counted under "recorded"; the first reasons torch gives are kept, ``mismatch reasons``), warm-up
runs, and runs without a graph ("eager": a replay that did not happen).
"""
from __future__ import annotations

import collections
import gc
import itertools
import logging
import sys
import threading
import time

GIB = 1024 ** 3


MEMORY_FIELDS = ("allocated GiB", "reserved GiB", "default pool allocated GiB", "default pool reserved GiB",
                 "graph pools allocated GiB", "graph pools reserved GiB", "graph pools")


def _memory() -> dict:
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return dict.fromkeys(MEMORY_FIELDS)
    try:
        segments = torch.cuda.memory_snapshot(include_traces=False)  # newer torch: skip the (unused) traces
    except TypeError:
        segments = torch.cuda.memory_snapshot()
    sums = {"default": [0, 0], "graph": [0, 0]}
    pools = set()
    for segment in segments:
        pool = tuple(segment["segment_pool_id"])
        allocated = segment.get("allocated_size")
        if allocated is None:
            allocated = sum(block["size"] for block in segment["blocks"] if block["state"] == "active_allocated")
        part = sums["default" if pool == (0, 0) else "graph"]
        part[0] += allocated
        part[1] += segment["total_size"]
        if pool != (0, 0):
            pools.add(pool)
    return {"allocated GiB": torch.cuda.memory_allocated() / GIB, "reserved GiB": torch.cuda.memory_reserved() / GIB,
            "default pool allocated GiB": sums["default"][0] / GIB, "default pool reserved GiB": sums["default"][1] / GIB,
            "graph pools allocated GiB": sums["graph"][0] / GIB, "graph pools reserved GiB": sums["graph"][1] / GIB,
            "graph pools": len(pools)}


def _value(part):
    """``part()``, or None where torch's internals moved."""
    try:
        return part()
    except Exception:
        return None


def _alive(manager) -> int:
    """Recordings alive in one tree: its nodes (each a recorded CUDA graph; warm-up nodes are not kept in it)."""
    count, nodes = 0, [node for nodes in (manager.roots or {}).values() for node in nodes]
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return count


def _graphs(managers: list | None) -> dict:
    # What was recorded, passed over or warmed up: "graph events" (per request, with torch's reasons).
    return {"tree managers": _value(lambda: len(managers)),
            "recordings alive": _value(lambda: sum(_alive(manager) for manager in managers))}


def _on_meta(module) -> bool:
    parameter = next(module.parameters(), None)
    return parameter is not None and parameter.device.type == "meta"


def _objects() -> tuple[list, list, int]:
    """(CUDA-graph tree managers, UNetModel objects, count of all) among the objects gc tracks."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    manager_type = getattr(trees, "CUDAGraphTreeManager", None)
    objects = gc.get_objects()
    kinds = list(map(type, objects))  # C-level passes: a few times faster than a Python loop over ~1M objects
    wanted = {kind for kind in set(kinds) if kind is manager_type or kind.__name__ == "UNetModel"}
    found = list(itertools.compress(objects, map(wanted.__contains__, kinds)))
    count = len(objects)
    del objects, kinds
    return ([thing for thing in found if type(thing) is manager_type],
            [thing for thing in found if type(thing) is not manager_type], count)


class _GraphEvents(logging.Handler):
    """Counts the CUDA-graph trees' debug messages by kind and keeps the first mismatch reasons, until taken."""

    KINDS = {"[%s] Recording function": "recorded", "[%s] Re-recording function": "passed over",
             "[%s] Running warmup function": "warm-ups", "[%s] Running eager function": "eager"}

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.counts, self.reasons = collections.Counter(), []

    def emit(self, record: logging.LogRecord) -> None:
        kind = next((kind for start, kind in self.KINDS.items() if str(record.msg).startswith(start)), None)
        if kind is not None:
            self.counts[kind] += 1
        if kind == "passed over" and len(self.reasons) < 3:  # formatting only these: Recording's lists the inputs
            self.reasons.append(record.getMessage()[:400])

    def take(self) -> dict:
        taken = {"graph events": dict(self.counts), "mismatch reasons": self.reasons}
        self.counts, self.reasons = collections.Counter(), []
        return taken


def _listen() -> _GraphEvents | None:
    try:
        from torch._inductor import cudagraph_trees

        handler = _GraphEvents()
        cudagraph_trees.log.addHandler(handler)
        cudagraph_trees.log.setLevel(logging.DEBUG)
        cudagraph_trees.log.propagate = False
        return handler
    except Exception:
        return None


_EVENTS = _listen()


def memory_probe() -> dict:
    started = time.perf_counter()
    answer = {"cuda": None, **(_value(_memory) or dict.fromkeys(MEMORY_FIELDS))}
    answer["cuda"] = answer["allocated GiB"] is not None
    try:
        gc_started = time.perf_counter()
        managers, unets, count = _objects()
        answer.update({"gc objects": count, "gc s": time.perf_counter() - gc_started})
    except Exception:
        managers = unets = None  # the fields below are then null
    answer.update(_graphs(managers))
    answer.update({"UNets": _value(lambda: len(unets)), "meta UNets": _value(lambda: sum(map(_on_meta, unets)))})
    answer.update(_EVENTS.take() if _EVENTS is not None else {"graph events": None, "mismatch reasons": None})
    answer.update({"threads": threading.active_count(), "probe s": time.perf_counter() - started})
    del managers, unets
    return answer


def _add_route(_demo, app) -> None:
    app.add_api_route("/onediff-bench/memory", memory_probe, methods=["GET"])


try:
    from modules import script_callbacks

    script_callbacks.on_app_started(_add_route)
except ImportError:  # imported outside webui (python -c): the functions above still work
    pass
