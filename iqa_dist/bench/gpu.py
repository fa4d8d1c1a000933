"""``bench gpu``: the one-command check for a GPU node, each part a time-boxed process.

Nothing is lost to a time-out: gpu_check.md and gpu_check.json are rewritten (atomically)
after every part, with the parts still to come listed as not run yet; each part's folder
and log are under the output folder; a part whose estimate exceeds what is left of
``--budget_s`` is skipped with a row saying so (estimates: gpu_parts.ESTIMATES_S).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..tools import markdown_table
from .common import REPO, Result, target, usable_cpus, why_failed
from .gpu_parts import COLUMNS, GPU_SIZES, SMOKE_SIZES, CheckSizes, Part, check_parts, estimate
from .preflight import preflight, preflight_line
from .sets import koniq_like_set

NOT_RUN = "not run yet (the check stopped before it)"


def run_logged(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> None:
    """Runs ``cmd`` with its output in ``log``, in a process group of its own, so that a
    time-out also ends what it started (a launcher's ranks, compile workers)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
            except ProcessLookupError:
                pass
            proc.wait()
    if code:
        raise RuntimeError(f"exit {code}: {why_failed(log.read_text(errors='replace'))}")


def run_part(part: Part, timeout: float, logs: Path, env: dict[str, str]) -> list[dict]:
    """The part's rows: its figures, or why it failed, in one line."""
    row = {"part": part.part, "model": part.model, "setting": part.setting}
    part.folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", f"{part.part} {part.model} {part.setting}".lower()).strip("-")
    log = logs / f"{part.folder.name}-{name}.log"
    start = time.monotonic()
    try:
        run_logged(part.cmd, timeout, log, env)
        rows = [row | r | {"status": "ok"} for r in part.read(part.folder)]
    except subprocess.TimeoutExpired:
        rows = [row | {"status": f"failed: timed out after {timeout:.0f} s"}]
    except (RuntimeError, OSError, ValueError, KeyError) as err:  # a missing or bad result file too
        rows = [row | {"status": f"failed: {err}"}]
    return [r | {"seconds": time.monotonic() - start} for r in rows]


def why_skipped(part: Part, left: float, budget: float, have_set: bool) -> str | None:
    if part.needs_set and not have_set:
        return "skipped: no packed set (the data row says why)"
    if part.estimate_s > left:
        return f"skipped: needs about {part.estimate_s:.0f} s, {max(0.0, left):.0f} s left of --budget_s {budget:.0f}"
    return None


def part_env(gpu: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # DeepSpeed compiles its ops just in time: the suite's cache, so that it happens once
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "iqa_dist" / "torch_extensions"))
    if gpu:
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def starved(rows: list[dict]) -> tuple[list[str], dict[str, bool]]:
    """Whether the GPU waits for data: measured by the end-to-end row (the real loader
    feeding the real step) against the same step on a batch in memory; the loader alone
    against the fastest training row says how far off it is."""
    ok = [r for r in rows if r["status"] == "ok"]
    lines, verdict = [], {}
    for e2e in (r for r in ok if r["part"] == "end-to-end"):
        same = next((r for r in ok if r["part"] == "train" and r["model"] == e2e["model"]
                     and _batch(r["setting"]) == _batch(e2e["setting"]) and r["setting"].endswith("compile none")),
                    None)
        if same is not None:
            ratio = e2e["patches/s"] / same["patches/s"]
            verdict[e2e["model"]] = ratio < 0.9
            lines.append(target(f"end-to-end / in-memory training patches/s >= 0.9 ({e2e['model']}, "
                                f"{e2e['setting']}; below it the GPU waits for data)", ratio, ratio >= 0.9))
    loader = next((r for r in ok if r["part"] == "loader"), None)
    trained = [r for r in ok if r["part"] == "train"]
    for model in dict.fromkeys(r["model"] for r in trained) if loader else ():
        fastest = max((r for r in trained if r["model"] == model), key=lambda r: r["patches/s"])
        ratio = loader["patches/s"] / fastest["patches/s"]
        lines.append(target(f"loader / {model} training patches/s >= 1 (fastest: {fastest['setting']})",
                            ratio, ratio >= 1))
    return lines or ["GPU starved: not known (the end-to-end, loader or training rows did not run)"], verdict


def _batch(setting: str) -> str:
    return re.match(r"batch (\d+)", setting).group(1)


def evaluation_target(rows: list[dict]) -> list[str]:
    row = next((r for r in rows if r["part"] == "eval" and r["status"] == "ok"), None)
    if row is None:
        return ["evaluation: not measured (its row says why)"]
    return [target("evaluation: ours / the batch-1 reference images/s >= 10x", row["speedup"], row["speedup"] >= 10)]


def build_set(sizes: CheckSizes, out: Path, workers: int) -> tuple[Path | None, dict]:
    """The packed set and its row; without it the parts that read it are skipped."""
    start, row = time.monotonic(), {"part": "data", "setting": f"{sizes.images} KonIQ-sized photographs, "
                                                               "packed --resize koniq"}
    shards = None
    try:
        shards = koniq_like_set(out / "part-00", sizes.images, workers)
        row["status"] = "ok"
    except ImportError as err:  # webdataset: carried in .whl (tests/gpu/wheels.sh)
        row["status"] = f"failed: {err} (bash tests/gpu/wheels.sh here, then carry .whl)"
    except (OSError, ValueError) as err:
        row["status"] = f"failed: {why_failed(str(err))}"
    return shards, row | {"seconds": time.monotonic() - start}


def bench_gpu(args: argparse.Namespace) -> Result:
    # a time-out's SIGTERM as an exception: the running part's process group is ended with us
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run_check(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_check(args: argparse.Namespace) -> Result:
    gpu = torch.cuda.is_available() and not args.smoke
    sizes, start = (GPU_SIZES if gpu else SMOKE_SIZES), time.monotonic()
    budget = sizes.budget_s if args.budget_s is None else args.budget_s
    pre = preflight(gpu, args.workers or (usable_cpus() if gpu else min(2, usable_cpus())), max(sizes.batch_sizes))
    print(preflight_line(pre), flush=True)
    out, workers = args.out, pre["workers"]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    check = Result("gpu", [], [], {"mode": "gpu" if gpu else "smoke (CPU sizes)", "budget_s": budget,
                                   "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpus": usable_cpus(),
                                   "loader_workers": workers, "preflight": pre, "gpu_starved": {}})
    shards, data_row = None, None
    parts = check_parts(sizes, out / "part-00" / "shards", out, workers, gpu)
    if estimate(sizes, "data") <= budget:
        write_check(check, out, parts, start)
        shards, data_row = build_set(sizes, out, workers if gpu else 0)
    check.rows.append(data_row or {"part": "data", "status": f"skipped: --budget_s {budget:.0f} leaves no time"})
    write_check(check, out, parts, start)
    for i, part in enumerate(parts):
        left = budget - (time.monotonic() - start)
        skipped = why_skipped(part, left, budget, shards is not None)
        check.rows += ([{"part": part.part, "model": part.model, "setting": part.setting, "status": skipped}]
                       if skipped else run_part(part, min(sizes.part_s, left), out / "logs", part_env(gpu)))
        write_check(check, out, parts[i + 1:], start)
    check.rows = [{c: r.get(c, "") for c in COLUMNS} for r in check.rows]
    return check


def write_check(check: Result, out: Path, to_come: list[Part], start: float) -> None:
    """gpu_check.md and .json as they stand, each replaced in one step: a check killed at
    any moment leaves the rows done so far and the parts it did not reach."""
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in check.rows]
    rows += [{c: "" for c in COLUMNS} | {"part": p.part, "model": p.model, "setting": p.setting, "status": NOT_RUN}
             for p in to_come]
    lines, verdict = starved(rows)
    check.targets = lines + evaluation_target(check.rows)
    check.figures |= {"seconds": time.monotonic() - start, "gpu_starved": verdict, "complete": not to_come}
    f, pre = check.figures, check.figures["preflight"]
    head = (f"# GPU check: `python -m iqa_dist.bench gpu`\n\n{f['date']}; {pre['gpu']}; torch {pre['torch']} "
            f"(CUDA {pre['cuda']}); {f['cpus']} CPUs; mode {f['mode']}; {f['seconds']:.0f} s so far of "
            f"--budget_s {f['budget_s']:.0f}{'' if to_come else ', done'}.\n\n{preflight_line(pre)}\n\n"
            "patches/s: training (a window of steps, at least 2 s on a GPU), loader, or evaluation; "
            "peak alloc / reserved GiB: the GPU's max_memory_allocated / max_memory_reserved (on a CPU both "
            "are the process's peak RSS); first step s: includes compiling. Launch rows check that a launch "
            "works (one process): they claim no speed.\n")
    body = markdown_table(rows) + "\n\n" + "\n".join(f"- {line}" for line in check.targets)
    _replace(out / "gpu_check.md", f"{head}\n{body}\n")
    _replace(out / "gpu_check.json", json.dumps(vars(check) | {"rows": rows}, indent=1, default=str))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one
