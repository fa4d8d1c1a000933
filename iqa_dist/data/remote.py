"""Packed sets behind a URL, staged once per node into a local cache and then read as a
local folder.

Sources (``--dataset``, ``--shards``, ``cross_datasets``):

- ``http://`` and ``https://`` URLs of the packed folder (read with the standard library);
- any other fsspec URL, e.g. ``s3://bucket/shards/koniq-10k`` (fsspec's backend for the
  protocol must be installed: s3fs for ``s3://``, gcsfs for ``gs://``);
- ``pipe:CMD``, webdataset's convention: ``CMD`` prints one file to stdout, with ``{}``
  where the file's name goes, e.g. ``pipe:aws s3 cp s3://bucket/koniq-10k/{} -``.

A source's files are those of its packed folder: ``manifest.parquet``, ``card.json``,
``_info.json`` and the shards the manifest names. Each is downloaded under a temporary
name and renamed when complete; a shard is renamed only once its sha1 matches the
manifest's ``shard_sha1``, so a file in the cache is a checked file and a later run (or
rank) reuses it without downloading or hashing it again. The cache folder is keyed by the
source's text (a hash of it): a set packed again behind the same URL needs its cache folder removed.
Processes staging one source at once (the ranks of a node, or separate jobs) take turns
by a lock file in the cache, so each file is downloaded once per cache.

Nodes stage on their own: where one node would download for longer than ``dist_timeout_s``
while the others wait in a collective, stage first, once per node:

    python -m iqa_dist.data.remote https://host/shards/koniq-10k [--cache_dir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable, Iterator

from .. import atomic
from ..config import ConfigError
from .manifest import MANIFEST, ManifestError, file_sha1, read_manifest, read_rows

SMALL_FILES = (MANIFEST, "card.json", "_info.json")  # the folder's files beside its shards
PLACEHOLDER = "{}"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class RemoteError(ConfigError):
    """A source that cannot be staged: a bad URL, a missing fsspec backend, a failed
    download, a file damaged on every try; the message is one line naming it."""


def is_remote(source: str) -> bool:
    return source.startswith("pipe:") or bool(_URL.match(source))


def set_name(source: str) -> str:
    """The packed folder's name in a source (``koniq-10k`` in ``https://host/koniq-10k`` or
    ``pipe:cat /data/koniq-10k/{}``), for naming runs and cache folders."""
    if source.startswith("pipe:"):  # the command's last word with a path in it
        words = source.removeprefix("pipe:").replace(PLACEHOLDER, "").split()
        source = next((w for w in reversed(words) if "/" in w), words[-1] if words else "")
    return Path(source.rstrip("/")).name or "set"


def cache_root(cache_dir: str | None) -> Path:
    """``cache_dir``, else ``$IQA_CACHE``, else ``~/.cache/iqa_dist``."""
    return Path(cache_dir or os.environ.get("IQA_CACHE") or Path.home() / ".cache" / "iqa_dist")


def stage(source: str, cache_dir: str | None = None) -> Path:
    """The local folder holding ``source``'s packed set, downloading what is not there yet."""
    opener = _opener(source)
    root = cache_root(cache_dir)
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    folder = root / key / re.sub(r"[^\w.-]+", "_", set_name(source))  # named as the set: runs and tables say so
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RemoteError(f"{root}: cannot stage {source} there ({err.strerror}); "
                          "set cache_dir (or IQA_CACHE) to a writable folder") from None
    with _locked(root / key / "lock", source):
        for stale in folder.glob(f".*{atomic.SUFFIX}"):  # a killed stager's; we hold the lock
            stale.unlink(missing_ok=True)
        for name in SMALL_FILES:
            if not (folder / name).exists():
                _fetch(opener, source, name, folder / name, lambda tmp: _unreadable(tmp, name))
        sums = _shard_sums(folder, source)
        missing = [s for s in sorted(sums) if not (folder / s).exists()]
        if missing:
            print(f"staging {len(missing)} of {len(sums)} shards of {source} into {folder}",
                  file=sys.stderr, flush=True)
        for shard in missing:
            _fetch_checked(opener, source, shard, folder / shard, sums[shard])
    return folder


@contextlib.contextmanager
def _locked(path: Path, source: str) -> Iterator[None]:
    """The lock on one source's cache folder; a process that must wait says so."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"staging {source}: waiting for another process staging it (lock {path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shard_sums(folder: Path, source: str) -> dict[str, str]:
    """{shard: sha1} from the staged manifest."""
    try:
        rows = read_manifest(folder)  # checked when it was downloaded; damaged since, it is fetched again
    except ManifestError as err:
        _forget(folder)
        raise RemoteError(f"{source}: {err}") from None
    if rows and "shard_sha1" not in rows[0]:
        _forget(folder)  # fetched again once the set is packed again
        raise RemoteError(f"{_where(source, MANIFEST)}: records no shard checksums (packed by an older "
                          "iqa_dist); run the same pack command on the packed folder again to add "
                          "them (no image is packed again), or read it from a local path")
    sums = {r["shard"]: r["shard_sha1"] for r in rows}
    odd = next((s for s in sums if Path(s).name != s or s.startswith(".")), None)
    if odd is not None:  # a name that would write outside the cache folder
        raise RemoteError(f"{_where(source, MANIFEST)}: names a shard {odd!r}, not a file name")
    return sums


def _forget(folder: Path) -> None:
    for name in SMALL_FILES:
        (folder / name).unlink(missing_ok=True)


def _unreadable(path: Path, name: str) -> str | None:
    """Why a download of the small file ``name`` is not what pack writes (None: it is)."""
    try:
        if name == MANIFEST:
            read_rows(path)
        else:
            json.loads(path.read_text())
    except ValueError as err:  # the manifest's ManifestError, json's and UTF-8's errors
        return f"unreadable ({str(err).splitlines()[0]})"
    return None


def _fetch_checked(opener: Callable[[str], IO[bytes]], source: str, name: str, dest: Path,
                   sha1: str) -> None:
    """A shard, fetched again once when its bytes do not match the manifest's sha1."""
    def check(path: Path) -> str | None:
        got = file_sha1(path)
        return None if got == sha1 else f"damaged download: sha1 {got[:12]}, the manifest says {sha1[:12]}"

    problem = _fetch(opener, source, name, dest, check, final=False)
    if problem:
        print(f"warning: {_where(source, name)}: {problem}; fetching it again", file=sys.stderr, flush=True)
        _fetch(opener, source, name, dest, check)


def _fetch(opener: Callable[[str], IO[bytes]], source: str, name: str, dest: Path,
           check: Callable[[Path], str | None], final: bool = True) -> str | None:
    """Download ``name`` to ``dest`` through a temporary, kept only when ``check`` finds no
    problem; otherwise the problem (a RemoteError when ``final``)."""
    with atomic.temporary(dest) as tmp:
        try:
            with opener(name) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        except (OSError, http.client.HTTPException, subprocess.SubprocessError) as err:
            if atomic.disk_full(err):
                raise RemoteError(f"{dest.parent}: no space left to stage {_where(source, name)}") from None
            raise RemoteError(f"{_where(source, name)}: cannot download ({_reason(err)})") from None
        problem = check(tmp)
        if problem is None:
            atomic.replace(tmp, dest)
        elif final:
            raise RemoteError(f"{_where(source, name)}: {problem}")
        return problem


def _where(source: str, name: str) -> str:
    """The source's file ``name``, as a user would fetch it by hand."""
    if source.startswith("pipe:"):
        return source.replace(PLACEHOLDER, name)
    return f"{source.rstrip('/')}/{name}"


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


# ---------------------------------------------------------------- openers


def _opener(source: str) -> Callable[[str], IO[bytes]]:
    """name -> a readable binary stream of the source's file of that name."""
    if source.startswith("pipe:"):
        command = source.removeprefix("pipe:")
        if PLACEHOLDER not in command:
            raise RemoteError(f"{source}: a pipe: source needs {PLACEHOLDER} where the file name goes, "
                              "e.g. pipe:cat /data/koniq-10k/{}")
        return lambda name: _piped(command.replace(PLACEHOLDER, shlex.quote(name)))
    base = source.rstrip("/")
    if base.split("://")[0].lower() in ("http", "https"):
        return lambda name: urllib.request.urlopen(f"{base}/{name}", timeout=60)
    return _fsspec_opener(base)


def _fsspec_opener(base: str) -> Callable[[str], IO[bytes]]:
    """fsspec's filesystem for the URL's protocol, or a RemoteError saying what to install."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = base.split("://")[0]
    try:
        fs = fsspec.filesystem(protocol)
    except ImportError:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise RemoteError(f"{base}: reading {protocol}:// URLs needs the {package} package "
                          f"(pip install {package})") from None
    except ValueError:
        raise RemoteError(f"{base}: fsspec knows no protocol {protocol!r}") from None
    return lambda name: fs.open(f"{base}/{name}", "rb")


@contextlib.contextmanager
def _piped(command: str) -> Iterator[IO[bytes]]:
    """The command's stdout; an OSError with its last line of stderr when it fails. Its
    stderr goes to a file: a pipe left unread would stall a chatty command (progress bars)."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=log)
        try:
            yield proc.stdout
            if proc.wait():
                log.seek(0)
                err = log.read().decode(errors="replace").strip()
                raise OSError(f"`{command}` exited with {proc.returncode}"
                              + (f": {err.splitlines()[-1]}" if err else ""))
        finally:
            proc.stdout.close()  # before waiting: a command still writing gets SIGPIPE
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iqa_dist.data.remote",
                                description="Stage packed sets from URLs into this node's cache; "
                                            "prints each one's local folder.")
    p.add_argument("sources", nargs="+", help="http(s)://, s3://... or pipe:CMD with {} (see the README)")
    p.add_argument("--cache_dir", help="default: $IQA_CACHE, else ~/.cache/iqa_dist")
    args = p.parse_args(argv)
    local = next((s for s in args.sources if not is_remote(s)), None)
    if local is not None:
        p.error(f"{local}: not a URL nor pipe: (a local folder is read where it is)")
    try:
        for source in args.sources:
            print(stage(source, args.cache_dir), flush=True)
    except RemoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
