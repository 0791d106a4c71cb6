"""``webui_bench.py soak``: many mixed requests in one webui, with the script (issue 13, item 3).

Each round makes, for every checkpoint (two SD1.5, two SDXL by default): an image at each of three sizes, a hires fix
from the third size to the first, the arch's LoRA at the third size (the next request is without it again), the other
checkpoint of the same architecture as refiner, and LoRA plus refiner; the seed changes from round to round. Checks:
no failed request; the script compiled or reused its graph in every request (never an eager fallback); every
``--compare-every``-th request's image equals eager webui's for the same request; compiles happen only in requests
that bring a shape (architecture, width, height) not seen before; GPU memory in use after the last round is within 10%
of its level after the first (each request's row in the JSON also holds the memory after it). ``--stop-at`` (seconds since the epoch) ends the run early, between requests.

Where webui has the bench's memory probe (``bench/memory_probe``, which ``bench/webui_start.py`` installs), each row
also holds its answer after the request (``"probe"``: memory in CUDA-graph pools and elsewhere, CUDA-graph recordings,
UNetModels alive and on meta), and the table of the requests after which memory grew splits each step by those.
``--eager``: the same plan without the script, webui's own memory curve to compare with; the checks on eager
fallbacks, compiles and images against eager's do not apply to it and are skipped.
"""
from __future__ import annotations

import time

MEMORY_TOLERANCE = 0.10
TINY = {"sd15": ["tiny-sd15-a", "tiny-sd15-b"], "sdxl": ["tiny-sdxl", "tiny-sdxl-b"],
        "lora": {"sd15": "tiny-lora-sd15", "sdxl": "tiny-lora-sdxl"},
        "sizes": {"sd15": "96x96,64x96,64x64", "sdxl": "96x96,64x96,64x64"}}
FULL = {"sd15": ["sd15-a", "sd15-b"], "sdxl": ["sdxl-a", "sdxl-b"],
        "lora": {"sd15": "lora-sd15", "sdxl": "lora-sdxl"},
        "sizes": {"sd15": "768x768,512x768,512x512", "sdxl": "1024x1024,768x1024,768x768"}}


def models(tiny: bool) -> dict:
    return TINY if tiny else FULL


def model_names(tiny: bool) -> set[str]:
    chosen = models(tiny)
    return {*chosen["sd15"], *chosen["sdxl"], *chosen["lora"].values()}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = [tuple(int(v) for v in size.split("x")) for size in text.split(",")]
    if len(sizes) != 3:
        raise SystemExit(f"three sizes WIDTHxHEIGHT expected, got {text!r}")
    return sizes


def round_plan(chosen: dict, round_number: int, steps: int) -> list[dict]:
    """The requests of one round: {checkpoint, what, payload, shapes} (shapes: the UNet input sizes it uses)."""
    plan = []
    for index in (0, 1):  # SD1.5 a, SDXL a, SD1.5 b, SDXL b: a short run covers both architectures
        for arch in ("sd15", "sdxl"):
            sizes = parse_sizes(chosen["sizes"][arch])
            large, small = sizes[0], sizes[2]
            lora = f" <lora:{chosen['lora'][arch]}:0.8>"
            checkpoint = chosen[arch][index]
            other = chosen[arch][1 - index]
            base = {"steps": steps, "seed": 1000 + round_number, "prompt": "a photo of a cat, highly detailed"}
            refiner = {"refiner_checkpoint": other, "refiner_switch_at": 0.6}
            at_small = {**base, "width": small[0], "height": small[1]}
            requests = [(f"{w}x{h}", "plain", {**base, "width": w, "height": h}, [(w, h)]) for w, h in sizes]
            requests += [
                (f"hires {small[0]}x{small[1]} -> {large[0]}x{large[1]}", "hires fix",
                 {**at_small, "enable_hr": True, "hr_resize_x": large[0], "hr_resize_y": large[1],
                  "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": max(1, steps // 2)},
                 [small, large]),
                ("LoRA", "LoRA", {**at_small, "prompt": base["prompt"] + lora}, [small]),
                (f"refiner {other}", "refiner", {**at_small, **refiner}, [small]),
                (f"LoRA + refiner {other}", "LoRA + refiner", {**at_small, **refiner, "prompt": base["prompt"] + lora},
                 [small]),
            ]
            plan += [{"checkpoint": checkpoint, "arch": arch, "what": what, "kind": kind, "payload": payload,
                      "shapes": {(arch, *shape) for shape in shapes}} for what, kind, payload, shapes in requests]
    return plan


def memory(ui) -> dict:
    """GiB: the GPU's memory in use (all processes, as nvidia-smi counts it) and torch's allocator in webui; the
    process's RSS where webui runs on the CPU."""
    import requests

    answer = requests.get(ui.url + "/sdapi/v1/memory", timeout=60).json()
    gib = 1024 ** 3
    cuda = answer.get("cuda", {})
    if "system" in cuda:
        return {"device used GiB": cuda["system"]["used"] / gib, "allocated GiB": cuda["allocated"]["current"] / gib,
                "reserved GiB": cuda["reserved"]["current"] / gib}
    return {"process RSS GiB": answer.get("ram", {}).get("used", 0) / gib}


def probe(ui) -> dict | None:
    """The memory probe's answer (bench/memory_probe), None where webui has none (a webui not started by
    webui_start: its 404 turns the probe off for the rest of the soak)."""
    import requests

    if getattr(ui, "no_probe", False):
        return None
    response = requests.get(ui.url + "/onediff-bench/memory", timeout=120)
    if response.status_code != 200:
        ui.no_probe = True
        return None
    return response.json()


def compile_starts(started) -> int:
    """Compiles begun in the started webui so far (the script's console line); None for a webui given by --url."""
    return None if started is None else started.log_text().count("OneDiff: compiling the UNet")


def soak(ui, args, started=None, compare=None, outcome_of=None) -> list[dict]:
    """``compare(payload) -> (mean, max)`` and ``outcome_of(infotext)`` come from webui_bench."""
    chosen = {**models(args.tiny)}
    chosen["sizes"] = {"sd15": args.sizes_sd15 or chosen["sizes"]["sd15"],
                       "sdxl": args.sizes_sdxl or chosen["sizes"]["sdxl"]}
    rows, rounds = [], []
    seen: set = set()
    failed = fallbacks = compared = unequal = compiles_on_seen = number = 0
    stopped = ""
    started_at = time.perf_counter()
    round_number = 0
    while number < args.count and not stopped:
        round_number += 1
        round_rows = []
        for request in round_plan(chosen, round_number, args.steps):
            if number >= args.count:
                break
            if args.stop_at and time.time() + args.reserve > args.stop_at:
                stopped = f"--stop-at reached before request {number + 1}"
                break
            number += 1
            row = {"bench": "soak", "request": number, "round": round_number, "checkpoint": request["checkpoint"],
                   "arch": request["arch"], "what": request["what"], "kind": request["kind"]}
            before = compile_starts(started)
            new_shapes = request["shapes"] - seen
            seen |= request["shapes"]
            try:
                ui.select(request["checkpoint"])
                seconds, infotext = ui.txt2img(not args.eager, **request["payload"])
                row.update(s=seconds, outcome="eager (--eager)" if args.eager else outcome_of(infotext))
            except (SystemExit, Exception) as error:  # webui_bench raises SystemExit on an HTTP error
                failed += 1
                row.update(error=str(error)[:500])
                round_rows.append(row)
                print(f"request {number} ({request['checkpoint']}, {request['what']}) FAILED: {str(error)[:300]}",
                      flush=True)
                continue
            if not args.eager and row["outcome"].startswith(("eager", "not used", "not in")):
                fallbacks += 1
            after = compile_starts(started)
            row["compiles"] = (after - before) if after is not None else int("compiled" in row["outcome"])
            row["new shapes"] = len(new_shapes)
            if row["compiles"] > len(new_shapes):
                compiles_on_seen += 1
            if args.compare_every and number % args.compare_every == 0 and not args.eager:
                mean, largest = compare(request["payload"])
                row.update({"difference mean": mean, "difference max": largest})
                compared += 1
                unequal += not (mean <= args.mean_limit and largest <= args.max_limit)
            row.update(memory(ui))  # after every request: which kind of request leaves memory behind
            answer = probe(ui)  # and what holds it
            if answer is not None:
                row["probe"] = answer
            round_rows.append(row)
        if not round_rows:
            break
        rounds.append({"bench": "soak-round", "round": round_number, "requests": len(round_rows),
                       "failed": sum("error" in row for row in round_rows),
                       "compiles": sum(row.get("compiles", 0) for row in round_rows),
                       "s": sum(row.get("s", 0) for row in round_rows), **memory(ui)})
        rows += round_rows
        print(f"round {round_number}: {rounds[-1]}", flush=True)
    key = next(iter(k for k in rounds[0] if k.endswith("GiB")), None) if rounds else None
    memory_growth = (rounds[-1][key] / rounds[0][key] - 1) if key and rounds[0][key] else None
    on_gpu = key == "device used GiB"
    summary = {"bench": "soak-summary", "eager": bool(args.eager), "requests": number, "rounds": len(rounds),
               "failed": failed, "eager fallbacks": fallbacks, "compared": compared, "unequal images": unequal,
               "compiles": sum(row.get("compiles", 0) for row in rows), "distinct shapes": len(seen),
               "compiles on seen shapes": compiles_on_seen, "memory measure": key, "memory growth": memory_growth,
               "seconds": time.perf_counter() - started_at, "stopped": stopped or "no"}
    summary["ok"] = (failed == 0 and fallbacks == 0 and unequal == 0 and compiles_on_seen == 0 and number > 0
                     and (not on_gpu or abs(memory_growth) <= MEMORY_TOLERANCE))
    print_tables(rows, rounds, summary, key)
    return rows + rounds + [summary]


def memory_steps(rows: list[dict], key: str | None, least: float = 0.1) -> list[tuple[dict, dict]]:
    """(request before, request) for the requests after which the memory measure, or torch's allocated memory, rose
    by ``least`` GiB or more since the request before."""
    measured = [row for row in rows if key and key in row]
    keys = [k for k in (key, "allocated GiB") if k]
    return [(before, row) for before, row in zip(measured, measured[1:])
            if any(row.get(k, 0) - before.get(k, 0) >= least for k in keys)]


PROBE_COLUMNS = ["allocated GiB: CUDA-graph pools / elsewhere", "reserved GiB: CUDA-graph pools / elsewhere",
                 "CUDA-graph recordings alive (change)", "CUDA-graph events in the request", "tree managers",
                 "UNetModels (on meta)"]


def probe_change(before: dict, row: dict) -> list[str]:
    """The growth table's PROBE_COLUMNS for one request (changes since the request before); n/a where the probe
    gave nothing."""
    old, new = before.get("probe") or {}, row.get("probe") or {}

    def change(field):
        return None if new.get(field) is None or old.get(field) is None else new[field] - old[field]

    def split(kind):
        total, graphs = change(f"{kind} GiB"), change(f"graph pools {kind} GiB")
        return "n/a" if total is None or graphs is None else f"{graphs:+.2f} / {total - graphs:+.2f}"

    recordings = change("recordings alive")
    recordings = "n/a" if recordings is None else f"{new['recordings alive']} ({recordings:+d})"
    unets = f"{new.get('UNets', 'n/a')} ({new.get('meta UNets', 'n/a')})"
    events = new.get("graph events")
    events = "n/a" if events is None else ", ".join(f"{kind} {count}" for kind, count in events.items()) or "none"
    return [split("allocated"), split("reserved"), recordings, events, f"{new.get('tree managers', 'n/a')}", unets]


def print_tables(rows: list[dict], rounds: list[dict], summary: dict, key: str | None) -> None:
    print("\n| round | requests | failed | compiles | s | " + " | ".join(k for k in rounds[0] if k.endswith("GiB"))
          + " |" if rounds else "\nno round completed")
    if rounds:
        print("|---" * (5 + sum(k.endswith("GiB") for k in rounds[0])) + "|")
    for r in rounds:
        print(f"| {r['round']} | {r['requests']} | {r['failed']} | {r['compiles']} | {r['s']:.1f} | "
              + " | ".join(f"{r[k]:.2f}" for k in r if k.endswith("GiB")) + " |")
    kinds: dict[str, list[float]] = {}
    for row in rows:
        if "s" in row and not row.get("compiles"):
            kinds.setdefault(f"{row['arch']} {row['kind']}", []).append(row["s"])
    print("\n| request kind (those without a compile) | count | mean s |\n|---|---|---|")
    for kind, times in kinds.items():
        print(f"| {kind} | {len(times)} | {sum(times) / len(times):.2f} |")
    grew = memory_steps(rows, key)
    if grew:
        measures = [key] + [k for k in ("allocated GiB",) if k != key and all(k in row for pair in grew for row in pair)]
        probed = any("probe" in row for _, row in grew)
        columns = measures + (PROBE_COLUMNS if probed else [])
        print(f"\n| requests after which {' or '.join(measures)} grew by 0.1 GiB or more | " + " | ".join(columns)
              + " |\n" + "|---" * (1 + len(columns)) + "|")
        for before, row in grew:
            cells = [f"{row[k] - before[k]:+.2f}" for k in measures] + (probe_change(before, row) if probed else [])
            print(f"| {row['request']}: {row['checkpoint']} {row['what']} | " + " | ".join(cells) + " |")
        reasons = [(row["request"], reason) for _, row in grew for reason in (row.get("probe") or {}).get("mismatch reasons") or []]
        for request, reason in reasons:
            print(f"request {request}, a CUDA-graph recording passed over: {reason}")
    growth = summary["memory growth"]
    skipped = "n/a (--eager)"
    checks = ([skipped] * 3 if summary["eager"] else
              [summary["eager fallbacks"], f"{summary['compared']} / {summary['unequal images']}",
               f"{summary['compiles']} / {summary['distinct shapes']} / {summary['compiles on seen shapes']}"])
    print(f"\n| soak check | value |\n|---|---|\n"
          f"| requests made | {'eager webui, without the script (--eager)' if summary['eager'] else 'with the script'} |\n"
          f"| requests (rounds) | {summary['requests']} ({summary['rounds']}) |\n"
          f"| failed requests | {summary['failed']} |\n| eager fallbacks | {checks[0]} |\n"
          f"| images compared with eager webui's / not equal | {checks[1]} |\n"
          f"| compiles / distinct shapes / requests that compiled a seen shape | {checks[2]} |\n"
          f"| {key or 'memory'}: last round vs first | "
          f"{'n/a' if growth is None else f'{growth * 100:+.1f}%'}"
          f"{'' if key == 'device used GiB' else ' (not checked: no GPU)'} |\n"
          f"| stopped early | {summary['stopped']} |\n| all checks | {'PASS' if summary['ok'] else 'FAIL'} |")
