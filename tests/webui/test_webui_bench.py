"""``bench/webui_bench.py`` against the real webui on tiny models: each benchmark prints its table and its checks hold
(the script ran compiled, a same-architecture switch compiles nothing). Timings on the CPU mean nothing; only the H100
numbers in README.md do."""
from __future__ import annotations

import json
import subprocess
import sys

from webui_harness import MEAN_LIMIT, REPO_ROOT

BENCH = REPO_ROOT / "bench" / "webui_bench.py"


def run_bench(webui, tmp_path, *args) -> tuple[str, list[dict]]:
    rows = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, str(BENCH), "--url", webui.base_url, "--json", str(rows), *args,
                        "--size", "64", "--steps", "3", "--repeat", "1"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"webui_bench {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout, [json.loads(line) for line in rows.read_text().splitlines()]


def test_speed_and_switch_tables(sd15, tmp_path):
    out, (row,) = run_bench(sd15, tmp_path, "speed", "--checkpoint", "tiny-sd15-a")
    assert "| it/s |" in out and "| end to end, s |" in out, out
    assert row["eager it/s"] > 0 and row["script it/s"] > 0
    assert row["image difference mean"] <= MEAN_LIMIT, row  # the same tolerance as the other webui tests
    assert row["image SSIM"] > 0.99 and not row["quantize"], row
    assert row["eager step"] is None and "no probe" in out, row  # this webui has no step probe: said so

    out, rows = run_bench(sd15, tmp_path, "switch", "--checkpoint", "tiny-sd15-a", "--to", "tiny-sd15-b")
    assert "| switch tiny-sd15-a -> tiny-sd15-b |" in out, out
    script_row = [row for row in rows if row.get("script")][-1]
    assert script_row["first request"] == "reused", script_row
    assert sd15.current_checkpoint().startswith("tiny-sd15-a")


def test_session_counts_compiles(sd15, tmp_path):
    """A switch reuses the graph, a hires fix second pass at a new size compiles once, and the bench counts it."""
    small = {"width": 64, "height": 64, "steps": 3}
    hires = {**small, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6,
             "hr_second_pass_steps": 2}
    plan = [{"checkpoint": "tiny-sd15-a", "what": "first", "payload": small},
            {"checkpoint": "tiny-sd15-b", "what": "switch", "payload": small},
            {"checkpoint": "tiny-sd15-a", "what": "hires", "payload": hires},
            {"checkpoint": "tiny-sd15-a", "what": "hires again", "payload": hires}]
    requests_file = tmp_path / "session.json"
    requests_file.write_text(json.dumps(plan))
    sd15.post("/sdapi/v1/txt2img", json={"prompt": "warm", "width": 64, "height": 64, "steps": 3,
                                        "script_name": "onediff_diffusion_model", "script_args": []})
    out, rows = run_bench(sd15, tmp_path, "session", "--requests", str(requests_file))
    graphs = [row["graphs"] for row in rows if "request" in row]
    assert graphs[1] == "reused" and graphs[3] == "reused", graphs
    assert graphs[2].count("compiled in") == 1, graphs
    assert rows[-1]["compiles"] == 1 and "compiles over 4 requests: 1" in out, out


def test_soak_mixes_requests_and_checks_them(sd15, tmp_path):
    """A short soak (one checkpoint's share of a round: three sizes, hires fix, LoRA on and off, refiner, LoRA with
    refiner): no failure, no eager fallback, the compared image equal to eager's, no compile for a shape seen before,
    and the table and JSON rows say so. The GPU run does the 200 requests (README)."""
    one_size = "64x64,64x64,64x64"  # one shape per architecture: at most one compile on the CPU
    out, rows = run_bench(sd15, tmp_path, "soak", "--models", "tiny", "--count", "7", "--compare-every", "7",
                          "--sizes-sd15", one_size, "--sizes-sdxl", one_size)
    requests = [row for row in rows if row["bench"] == "soak"]
    summary = rows[-1]
    assert [row["kind"] for row in requests] == ["plain"] * 3 + ["hires fix", "LoRA", "refiner", "LoRA + refiner"]
    assert {row["checkpoint"] for row in requests} == {"tiny-sd15-a"}, requests
    assert summary["failed"] == 0 and summary["eager fallbacks"] == 0 and summary["compared"] == 1, summary
    assert summary["unequal images"] == 0 and summary["compiles on seen shapes"] == 0, summary
    assert summary["ok"] and "| all checks | PASS |" in out, out
    assert not any("probe" in row for row in requests), requests[0]  # this webui has no memory probe: left out


def test_eager_soak_with_the_memory_probe(tmp_path):
    """``--start tiny``: webui_start's webui has the bench's memory probe, and each row holds its answer (memory fields
    null on the CPU, the UNetModels counted); ``--eager`` makes the requests without the script and skips the
    compile and compare checks."""
    rows_file = tmp_path / "rows.jsonl"
    one_size = "64x64,64x64,64x64"
    r = subprocess.run([sys.executable, str(BENCH), "--start", "tiny", "--json", str(rows_file), "soak", "--eager",
                        "--count", "2", "--steps", "3", "--sizes-sd15", one_size, "--sizes-sdxl", one_size],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"webui_bench failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    requests, summary = [row for row in rows if row["bench"] == "soak"], rows[-1]
    assert len(requests) == 2 and all(row["outcome"] == "eager (--eager)" for row in requests), requests
    for row in requests:
        probe = row["probe"]
        assert probe["cuda"] is False and probe["allocated GiB"] is None and probe["graph pools allocated GiB"] is None
        assert probe["UNets"] >= 1 and probe["meta UNets"] is not None and probe["tree managers"] == 0, probe
        assert probe["graph events"] == {} and probe["mismatch reasons"] == [], probe  # no CUDA graphs on the CPU
    assert summary["eager"] and summary["ok"] and summary["compared"] == 0, summary
    assert "| requests made | eager webui, without the script (--eager) |" in r.stdout, r.stdout
    assert "| eager fallbacks | n/a (--eager) |" in r.stdout, r.stdout


def test_speed_with_the_step_probe(tmp_path):
    """``--start tiny``: webui_start's webui has the bench's step probe, and ``speed`` reports a step's host time and
    its part in the model call, eager and with the script, from generations of exactly ``--steps`` steps (webui's own
    step counter reads 0 twice; a probe keyed on it would split them); no GPU time on the CPU. With ``--quantize int8
    --unquantized-first``, the script's unquantized steps too, measured before its quantized ones."""
    rows_file = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, str(BENCH), "--start", "tiny", "--json", str(rows_file), "speed", "--checkpoint",
                        "tiny-sd15-a", "--size", "64", "--steps", "6", "--repeat", "1", "--quantize", "int8", "--unquantized-first"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"webui_bench failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (row,) = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert "int8" in row["first request"], row  # the quantized graph compiled after the unquantized one
    for way in ("eager step", "script step", "script unquantized step"):
        times = row[way]
        # the model call is part of a step (medians over one step more for the model call: some slack)
        assert times["host step ms"] > 0 and 0 < times["host model ms"] <= 1.5 * times["host step ms"], row
        assert times["gpu step ms"] is None and times["gpu model ms"] is None, row
    assert "| a step, ms: host's time (in the model call)" in r.stdout and "GPU n/a" in r.stdout, r.stdout
    assert "| a step, ms, the script unquantized |" in r.stdout, r.stdout


def test_unquantized_first_without_quantize_is_refused():
    """``--unquantized-first`` alone would measure nothing it names: refused with what to add, before any webui."""
    r = subprocess.run([sys.executable, str(BENCH), "speed", "--unquantized-first"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "add --quantize" in r.stderr, r.stderr
