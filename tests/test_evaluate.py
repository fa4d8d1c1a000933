"""evaluate's command line: cross-data-set metrics, label direction from the cards, ranks."""
from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from iqa_dist.evaluate import main
from test_train import REPO, run
from conftest import free_port

COLUMNS = {"set", "split", "images", "srcc", "plcc", "plcc_logistic", "krcc", "rmse", "direction", "per_rank"}


@pytest.fixture(scope="module")
def trained_run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def dmos_copy(small_shards, tmp_path_factory) -> Path:
    """The same images and labels, but a card that says lower is better."""
    copy = tmp_path_factory.mktemp("dmos") / "small-dmos"
    shutil.copytree(small_shards, copy)
    card = json.loads((copy / "card.json").read_text())
    card.update(higher_is_better=False, label_name="DMOS")
    (copy / "card.json").write_text(json.dumps(card))
    return copy


def evaluate_cmd(*args: str) -> list[str]:
    return ["-m", "iqa_dist.evaluate", *args, "--workers", "1"]


def results(out: Path) -> dict[str, dict]:
    return {r["set"]: r for r in csv.DictReader(open(out / "results.csv"))}


@pytest.fixture(scope="module")
def one_process(trained_run, small_shards, dmos_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    done = run([sys.executable, *evaluate_cmd("--checkpoint", str(trained_run), "--shards", str(small_shards),
                                              str(dmos_copy), "--out", str(out))])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "small-dmos" in done.stdout and "srcc" in done.stdout  # the printed table
    return out


def test_every_output_is_written(one_process):
    assert COLUMNS <= set(pq.read_table(one_process / "results.parquet").column_names)
    assert "| set |" in (one_process / "results.md").read_text()
    assert {p.name for p in one_process.glob("scatter_*.png")} == {"scatter_shards.png", "scatter_small-dmos.png"}
    assert len(pq.read_table(one_process / "predictions.parquet")) == 2 * 24


def test_lower_is_better_set_gets_flipped_correlations(one_process):
    r = results(one_process)
    mos, dmos = r["shards"], r["small-dmos"]
    assert (mos["direction"], dmos["direction"]) == ("same", "flipped")
    assert int(mos["images"]) == int(dmos["images"]) == 24  # split "all"
    for metric in ("srcc", "plcc", "krcc"):
        assert float(mos[metric]) != 0 and float(dmos[metric]) == pytest.approx(-float(mos[metric]))
    assert float(dmos["rmse"]) == pytest.approx(float(mos["rmse"]))  # raw values, never flipped


def test_split_option_takes_one_split(trained_run, small_shards, tmp_path):
    done = run([sys.executable, *evaluate_cmd("--checkpoint", str(trained_run), "--shards", str(small_shards),
                                              "--split", "test", "--out", str(tmp_path))])
    assert done.returncode == 0, done.stderr[-3000:]
    row = results(tmp_path)["shards"]
    assert row["split"] == "test" and int(row["images"]) == 6  # 24 images, a quarter for test


def test_sets_are_scored_at_the_training_sets_geometry(trained_run, small_shards, tmp_path):
    """A model whose card says its training set was packed ``--resize seed`` scores a set of
    original pixels as that set packed ``--resize seed`` (the seed's cross-data-set protocol)."""
    from iqa_dist.pack import PackOptions, pack

    seed_run = tmp_path / "seed-run"
    shutil.copytree(trained_run / "checkpoints" / "best", seed_run)
    metrics = json.loads((seed_run / "metrics.json").read_text())
    metrics["label_card"]["options"]["resize"] = "seed"
    (seed_run / "metrics.json").write_text(json.dumps(metrics))
    resized = tmp_path / "resized"
    pack("csv", small_shards.parent / "src", resized, PackOptions(resize="seed", shard_size=5), workers=0)
    scores = {}
    for name, shards in (("raw", small_shards), ("packed", resized)):
        assert main(["--checkpoint", str(seed_run), "--shards", str(shards), "--out", str(tmp_path / name),
                     "--workers", "0"]) == 0
        scores[name] = {r["key"]: r["prediction"] for r in pq.read_table(tmp_path / name / "predictions.parquet")
                        .to_pylist()}
    assert scores["raw"].keys() == scores["packed"].keys() and len(scores["raw"]) == 24
    assert all(scores["raw"][k] == pytest.approx(p, rel=1e-6) for k, p in scores["packed"].items())


def test_missing_set_is_a_one_line_error(trained_run, tmp_path, capsys):
    assert main(["--checkpoint", str(trained_run), "--shards", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "nope" in err


@pytest.mark.slow
def test_two_ranks_score_each_image_exactly_once(trained_run, small_shards, one_process, tmp_path):
    out = tmp_path / "ddp"
    done = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                *evaluate_cmd("--checkpoint", str(trained_run), "--shards", str(small_shards), "--out", str(out))])
    assert done.returncode == 0, done.stderr[-3000:]
    row = results(out)["shards"]
    per_rank = [int(n) for n in row["per_rank"].split("/")]
    assert len(per_rank) == 2 and min(per_rank) > 0  # both ranks worked
    assert sum(per_rank) == int(row["scored"]) == int(row["images"]) == 24  # none twice, none left out
    ours = {r["key"]: r["prediction"] for r in pq.read_table(out / "predictions.parquet").to_pylist()}
    single = {r["key"]: r["prediction"] for r in pq.read_table(one_process / "predictions.parquet").to_pylist()
              if r["set"] == "shards"}
    assert ours.keys() == single.keys()
    assert all(ours[k] == pytest.approx(single[k], abs=1e-5) for k in ours)


def test_a_broken_set_is_one_line_and_the_finished_sets_are_written(trained_run, small_shards, tmp_path, capsys):
    from test_stream import broken_copy

    broken, shard = broken_copy(small_shards, tmp_path, "truncated")
    out = tmp_path / "out"
    code = main(["--checkpoint", str(trained_run), "--shards", str(broken), str(small_shards), "--out", str(out),
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"error: broken: {shard}: unreadable, truncated or corrupted" in err
    assert set(results(out)) == {"shards"}  # the set after the broken one was still evaluated and written
    assert "not evaluated: broken:" in (out / "results.md").read_text()


def test_scoring_reads_the_device_once_per_split(small_shards, host_reads):
    """Predictions stay on the device until the split is scored: as many host reads with
    twelve batches as with three, and the same scores."""
    from accelerate import Accelerator

    from iqa_dist.config import Config
    from iqa_dist.data.stream import load_split
    from iqa_dist.models import create_model
    from iqa_dist.scoring import local_predictions

    model = create_model("micro", dropout_rate=0.0, drop_path_rate=0.0)
    cfg, split = Config(model_size="micro", test_patch_num=2, workers=0), load_split(small_shards, "train")
    scored, reads = [], []
    for batch_size in (2, 8):
        with host_reads() as seen:
            scored.append(local_predictions(model, split, cfg, Accelerator(cpu=True), batch_size))
        reads.append(seen)
    assert len(split) == 12 and reads[0] == reads[1]
    (keys, preds, labels), (keys_8, preds_8, labels_8) = (zip(*s) for s in scored)
    assert keys == keys_8 and labels == labels_8 and preds == pytest.approx(preds_8, abs=1e-5)
