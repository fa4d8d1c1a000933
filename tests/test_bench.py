"""bench: every subcommand runs on a tiny configuration and prints its table.

Speeds are never asserted: they depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from iqa_dist.bench import main, usable_cpus
from iqa_dist.checkpoint import save_weights, write_json
from iqa_dist.config import Config, save_yaml
from iqa_dist.tools import model_from_config
from test_train import run


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # restored after each test: the benches set it


def bench(capsys, tmp_path: Path, *argv: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    assert main([*argv, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_data(capsys, tmp_path, small_shards):
    text, result = bench(capsys, tmp_path, "data", "--shards", str(small_shards), "--images", "4",
                         "--patch_num", "3", "--workers", "1", "--batch_size", "2", "--shuffle_buffer", "2",
                         "--passes", "2")
    assert "## bench data" in text and "reference" in text and "bound" in text
    assert "target ours / reference >= 20x" in text and "target bound / ours <= 1.3x" in text
    reference, serial, parallel, bound = result["rows"]
    # the clock starts at the first batch: the others are timed, 12 patches in all
    assert reference["patches"] == serial["patches"] == parallel["patches"] == 4 * 3 - 2
    assert min(reference["patches/s"], serial["patches/s"], bound["patches/s"]) > 0


def test_koniq_like_set_is_koniq_sized_jpegs_packed_as_koniq(tmp_path):
    from PIL import Image

    from iqa_dist.bench import KONIQ_SIZE, koniq_like_set
    from iqa_dist.data.manifest import read_manifest

    rows = read_manifest(koniq_like_set(tmp_path, 3, workers=0))
    assert len(rows) == 3 and {(r["width"], r["height"]) for r in rows} == {(512, 384)}
    for r in rows:
        with Image.open(r["path"]) as img:
            assert (img.format, img.size) == ("JPEG", KONIQ_SIZE)


def test_step(capsys, tmp_path):
    text, result = bench(capsys, tmp_path, "step", "--model_size", "micro", "--batch_size", "2",
                         "--iters", "1", "--warmup", "0")
    assert "## bench step" in text and "backbone only" in text and "target HyperIQA / backbone-only" in text
    assert [r["step"] for r in result["rows"]] == ["HyperIQA", "backbone only"]
    assert result["figures"]["ratio"] > 0


def test_eval_with_a_checkpoint(capsys, tmp_path, small_shards):
    cfg = Config(model_size="micro", test_patch_num=2)
    best = tmp_path / "run" / "checkpoints" / "best"
    save_weights(model_from_config(cfg).state_dict(), best / "model.safetensors")
    save_yaml(cfg, best / "config.yaml")
    write_json(best / "metrics.json", {"label_card": {"higher_is_better": True}})
    text, result = bench(capsys, tmp_path, "eval", "--checkpoint", str(tmp_path / "run"), "--shards",
                         str(small_shards), "--images", "3", "--patch_num", "2", "--workers", "0",
                         "--batch_size", "4", "--device", "cpu")
    assert "## bench eval" in text and "reference (batch 1" in text and "target ours / reference" in text
    assert [r["images"] for r in result["rows"]] == [3, 3, 3]
    assert "the model alone" in result["rows"][2]["evaluation"] and "target ours / the model alone" in text
    assert result["figures"]["model_size"] == "micro" and result["figures"]["ceiling"] > 0


@pytest.mark.slow
def test_ddp(capsys, tmp_path):
    text, result = bench(capsys, tmp_path, "ddp", "--model_size", "micro", "--batch_size", "2",
                         "--iters", "2", "--warmup", "1", "--repeats", "1")
    assert "## bench ddp" in text and "target 2 ranks / 1 rank" in text
    assert [r["ranks"] for r in result["rows"]] == [1, 2]  # the second really ran two processes


@pytest.mark.slow
def test_sweep(tmp_path, small_shards):
    base = tmp_path / "tiny.yaml"
    base.write_text("model_size: micro\nbatch_size: 4\ntrain_patch_num: 2\ntest_patch_num: 1\n"
                    "workers: 0\nshuffle_buffer: 8\n")
    out = tmp_path / "sweep.json"
    done = run([sys.executable, "-m", "iqa_dist.bench", "sweep", "--base", str(base), "--shards", str(small_shards),
                "--epochs", "2", "--max_steps_per_epoch", "1", "--lr", "1e-4", "1e-3", "--alpha", "0",
                "--max_concurrent", "1", "--json", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## bench sweep" in done.stdout and "ASHA" in done.stdout
    grid, asha = json.loads(out.read_text())["rows"]
    assert grid["trials"] == asha["trials"] == 2
    assert grid["epochs trained"] == 4  # every grid trial ran to the end
    assert asha["epochs trained"] <= 4


@pytest.mark.slow  # it launches processes: a time-boxed process per part, accelerate launch for three
def test_gpu_check_smoke_mode(tmp_path):
    """``bench gpu`` on a CPU runs its smoke sizes through the GPU code paths: every part
    of the check is there with figures, in the JSON and in the Markdown table."""
    done = run(["bash", str(Path(__file__).parent / "gpu" / "check.sh"), str(tmp_path / "out"), "--smoke"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("pre-flight: Python ") and "/dev/shm" in done.stdout.splitlines()[0]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {(r["part"], r["setting"].split(" (")[0]): r for r in result["rows"]}
    workers = f"{min(2, usable_cpus())} workers, batch 2"
    assert set(rows) == {("data", "8 KonIQ-sized photographs, packed --resize koniq"),
                         ("train", "batch 1"), ("train", "batch 2, compile none"),
                         ("train", "batch 2, compile aot_eager"), ("loader", workers),
                         ("end-to-end", f"batch 2, {min(2, usable_cpus())} loader workers, compile none"),
                         ("eval", "4 images x 2 crops, batch 2, fp32"), ("launch", "DDP launch check"),
                         ("launch", "DeepSpeed ZeRO-2 launch check"), ("launch", "DeepSpeed ZeRO-3 launch check")}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows.values())
    assert rows["train", "batch 1"]["setting"] == "batch 1 (the shipped per-GPU batch), compile none"
    for (part, _), r in rows.items():
        if part in ("train", "end-to-end"):
            assert r["patches/s"] > 0 and r["peak alloc GiB"] > 0 and r["peak reserved GiB"] > 0
        if part == "launch":  # a real gloo process group, the steps asked, finish() done
            assert r["detail"].startswith("backend gloo, 1 process, 2 steps,") and "no speed claimed" in r["detail"]
    assert rows["loader", workers]["patches/s"] > 0
    assert rows["eval", "4 images x 2 crops, batch 2, fp32"]["detail"].startswith("images/s: reference ")
    assert any(t.startswith("target evaluation: ours / the batch-1 reference") for t in result["targets"])
    assert result["figures"]["mode"].startswith("smoke") and set(result["figures"]["gpu_starved"]) == {"micro"}
    assert any(t.startswith("target end-to-end / in-memory training patches/s") for t in result["targets"])
    assert result["figures"]["complete"] and result["figures"]["preflight"]["packages"]["torch"] != "missing"
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    for r in result["rows"]:
        assert f"| {r['part']} | {r['model']} | {r['setting']} | ok |" in table
    assert len(list((tmp_path / "out" / "logs").glob("*.log"))) == 8  # one per part run as a process
    assert len(list((tmp_path / "out").glob("part-*/result.json"))) == 5  # each part's folder is under out


def test_gpu_check_skips_the_parts_its_budget_leaves_no_time_for(tmp_path):
    """A budget that fits the packed set alone: the set is built, every other part has a
    row saying it was skipped and why, and the table says the check is done."""
    out = tmp_path / "out"
    assert main(["gpu", "--smoke", "--out", str(out), "--budget_s", "10", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    data, *rest = result["rows"]
    assert data["part"] == "data" and data["status"] == "ok" and len(rest) == 8
    assert all(r["status"].startswith("skipped: needs about ") and "of --budget_s 10" in r["status"] for r in rest)
    assert result["figures"]["complete"] and "skipped: needs about 15 s" in (out / "gpu_check.md").read_text()


def test_gpu_check_tables_hold_every_part_done_before_the_next_starts(tmp_path, monkeypatch):
    """gpu_check.md and .json are rewritten after every part: when a part starts, they
    hold the rows of the parts before it and list it and the rest as not run yet."""
    from iqa_dist.bench import gpu

    seen = []

    def fake_part(part, timeout, logs, env):
        result = json.loads((tmp_path / "gpu_check.json").read_text())
        assert (tmp_path / "gpu_check.md").read_text().count(gpu.NOT_RUN) == len(result["rows"]) - len(seen) - 1
        seen.append([r["status"] for r in result["rows"]])
        return [{"part": part.part, "model": part.model, "setting": part.setting, "status": "ok", "patches/s": 1.0,
                 "speedup": 1.0}]

    monkeypatch.setattr(gpu, "build_set", lambda *a: (tmp_path, {"part": "data", "status": "ok"}))
    monkeypatch.setattr(gpu, "run_part", fake_part)
    gpu.bench_gpu(argparse.Namespace(smoke=True, out=tmp_path, budget_s=None, workers=1))
    assert [statuses.count("ok") for statuses in seen] == list(range(1, 9))  # the data row, then one more each
    assert all(len(statuses) == 9 for statuses in seen)
    assert gpu.NOT_RUN not in (tmp_path / "gpu_check.md").read_text()


def test_the_check_imports_without_what_the_gpu_image_lacks():
    """The GPU machine's image has no webdataset, deepspeed, ray or transformers: the
    bench, the packer and training import without them (each is imported where used)."""
    lacking = ["webdataset", "deepspeed", "ray", "transformers", "matplotlib"]
    code = (f"import sys; sys.modules.update(dict.fromkeys({lacking!r}))\n"  # None: 'No module named ...'
            "import iqa_dist.bench, iqa_dist.bench.gpu, iqa_dist.pack, iqa_dist.train\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {lacking!r} and sys.modules[m]))")
    done = run([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_gpu_check_trains_at_the_shipped_per_gpu_batches():
    from iqa_dist.bench.gpu_parts import GPU_SIZES, SMOKE_SHIPPED, shipped_batch, train_part

    assert [shipped_batch(m) for m in ("tiny", "base", "micro")] == [96 // 8, 32 // 8, SMOKE_SHIPPED]
    cmd = train_part(GPU_SIZES, "base", "none", Path("part")).cmd
    assert cmd[cmd.index("--batch_sizes") + 1:cmd.index("--shipped")] == ["4", "32", "96"]


def test_gpu_check_uses_fewer_loader_workers_when_shared_memory_is_small():
    from iqa_dist.bench.preflight import BUFFERS_PER_WORKER, loader_workers
    from iqa_dist.models.hyperiqa import PATCH

    per_worker = BUFFERS_PER_WORKER * 96 * PATCH * PATCH * 3
    assert loader_workers(16, 96, 3 * per_worker + 1) == 3
    assert loader_workers(16, 96, 100 * per_worker) == 16 and loader_workers(16, 96, None) == 16
