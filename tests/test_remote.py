"""Packed sets behind a URL (data/remote.py): staged once into a cache, checked, reused."""
from __future__ import annotations

import filecmp
import http.server
import json
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from iqa_dist.data.manifest import read_manifest
from iqa_dist.data.remote import RemoteError, main as stage_main, stage
from iqa_dist.data.stream import load_split
from iqa_dist.evaluate import main as evaluate_main
from iqa_dist.pack import PackOptions, pack
from iqa_dist.train import main as train_main
from test_train import REPO, env, epochs_done, machinery_args

SMALL_FILES = ("manifest.parquet", "card.json", "_info.json")


class Server:
    """http.server on 127.0.0.1 serving a folder; counts requests, damages files on demand,
    and can hold its first request until ``release`` is set."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        self.damaged: dict[str, int] = {}  # path -> responses to damage (-1: every one)
        self.first, self.release = threading.Event(), threading.Event()
        self.release.set()
        lock, server = threading.Lock(), self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                with lock:
                    first = not server.requests
                    server.requests.append(self.path)
                if first:
                    server.first.set()
                    server.release.wait(60)
                if server.damaged.get(self.path, 0):
                    server.damaged[self.path] -= 1
                    return self.send_damaged()
                return super().do_GET()

            def send_damaged(self):
                data = bytearray(Path(root, self.path.lstrip("/")).read_bytes())
                data[len(data) // 2] ^= 0xFF  # same length: only the sha1 can tell
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(bytes(data))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, folder: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{folder}"


@pytest.fixture
def server(small_shards):
    s = Server(small_shards.parent)  # the set is at <url>/shards
    yield s
    s.release.set()
    s.httpd.shutdown()
    s.httpd.server_close()


def every_file(shards: Path) -> list[str]:
    return sorted([f"/shards/{n}" for n in SMALL_FILES]
                  + [f"/shards/{s}" for s in {r["shard"] for r in read_manifest(shards)}])


def assert_same_files(staged: Path, original: Path) -> None:
    names = [*SMALL_FILES, *{r["shard"] for r in read_manifest(original)}]
    assert filecmp.cmpfiles(staged, original, names, shallow=False)[0] == names


def test_training_evaluation_and_a_resumed_run_read_a_set_over_http(server, small_shards, tmp_path):
    url, cache, run_dir = server.url("shards"), tmp_path / "cache", tmp_path / "run"

    def args(*extra: str) -> list[str]:
        return machinery_args(url, run_dir, "--max_steps_per_epoch", "1", "--cache_dir", str(cache), *extra)

    cross = f"pipe:cat {small_shards}/{{}}"
    assert train_main(args("--epochs", "1", "--cross_datasets", cross)) == 0
    assert sorted(server.requests) == every_file(small_shards)  # each file once
    assert "srcc" in json.loads((run_dir / "results.json").read_text())[f"cross_{cross}"]
    assert_same_files(stage(url, str(cache)), small_shards)
    fetched = len(server.requests)
    assert train_main(args("--epochs", "2", "--resume", "latest")) == 0
    assert epochs_done(run_dir) == 2
    out = tmp_path / "eval"
    assert evaluate_main(["--checkpoint", str(run_dir), "--shards", url, "--cache_dir", str(cache),
                          "--workers", "0", "--out", str(out)]) == 0
    assert "shards,all,24," in (out / "results.csv").read_text()  # named as the set, every image
    assert len(server.requests) == fetched  # the resumed run and the evaluation downloaded nothing


def test_pipe_cat_stages_a_set_and_a_pipe_without_a_placeholder_is_one_line(small_shards, tmp_path, capsys):
    assert stage_main([f"pipe:cat {small_shards}/{{}}", "--cache_dir", str(tmp_path)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder.name == "shards" and folder.parent.parent == tmp_path
    assert_same_files(folder, small_shards)
    assert len(load_split(folder, "all")) == 24
    with pytest.raises(RemoteError, match=r"^pipe:cat x: a pipe: source needs \{\} where the file name goes"):
        stage("pipe:cat x", str(tmp_path))
    with pytest.raises(RemoteError, match=r"manifest.parquet: cannot download \(`cat .*` exited with 1: .*No such file"):
        stage(f"pipe:cat {tmp_path / 'nothing'}/{{}}", str(tmp_path))


def test_a_damaged_shard_is_fetched_again_and_one_damaged_twice_is_one_line(server, small_shards, tmp_path,
                                                                            capsys):
    url, shard = server.url("shards"), f"/shards/{read_manifest(small_shards)[0]['shard']}"
    server.damaged[shard] = 1
    folder = stage(url, str(tmp_path / "once"))
    assert_same_files(folder, small_shards)
    assert Counter(server.requests)[shard] == 2
    warning = capsys.readouterr().err.splitlines()[-1]
    assert warning.startswith(f"warning: {url}{shard[7:]}: damaged download: sha1 ") and warning.endswith(
        "; fetching it again")

    server.damaged[shard] = -1
    args = machinery_args(url, tmp_path / "run", "--cache_dir", str(tmp_path / "always"))
    assert train_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {url}{shard[7:]}: damaged download: sha1 ")
    assert Counter(server.requests)[shard] == 4
    assert not list((tmp_path / "always").rglob(f"*{Path(shard).name}*"))  # nor a temporary


def test_two_processes_staging_one_url_download_each_file_once(server, small_shards, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from iqa_dist.data.remote import stage; stage(*sys.argv[1:])",
           server.url("shards"), str(tmp_path)]
    server.release.clear()  # the first download waits: the second stager must find the first staging
    first = subprocess.Popen(cmd, env=env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert server.first.wait(60)
        second = subprocess.Popen(cmd, env=env(), cwd=REPO, stderr=subprocess.PIPE, text=True)
        assert "waiting for another process staging it" in second.stderr.readline()
        server.release.set()
        assert first.wait(60) == 0 and second.wait(60) == 0
    finally:
        server.release.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.communicate()
    assert sorted(server.requests) == every_file(small_shards)


def test_a_pack_without_shard_checksums_is_one_line_and_packing_again_adds_them(small_shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(small_shards, old)
    table = pq.read_table(old / "manifest.parquet")
    pq.write_table(table.drop_columns(["shard_sha1"]), old / "manifest.parquet")
    for rows_file in old.glob("*.rows.json"):  # as an older pack left its finished shards
        done = json.loads(rows_file.read_text())
        done["rows"] = [{k: v for k, v in r.items() if k != "shard_sha1"} for r in done["rows"]]
        rows_file.write_text(json.dumps(done))
    source = f"pipe:cat {old}/{{}}"
    with pytest.raises(RemoteError, match="records no shard checksums .* run the same pack command"):
        stage(source, str(tmp_path / "cache"))
    pack("csv", small_shards.parent / "src", old, PackOptions(shard_size=5, rounds=2, split=(0.5, 0.25, 0.25)),
         workers=0)
    assert pq.read_table(old / "manifest.parquet").equals(table)  # the same manifest as a fresh pack
    assert_same_files(stage(source, str(tmp_path / "cache")), small_shards)


def test_a_protocol_without_its_fsspec_backend_is_one_line(tmp_path):
    with pytest.raises(RemoteError, match=r"^s3://bucket/koniq: reading s3:// URLs needs the s3fs package "
                                          r"\(pip install s3fs\)$"):
        stage("s3://bucket/koniq", str(tmp_path))
