#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels that the GPU machine's image lacks for the check
# (issue 18): it has no network, so they travel with the working tree (carry: [".whl"]) and
# check.sh installs them into a temporary site. Run here, where PyPI answers; at most 40 MiB.
#   webdataset (+ braceexpand): pack writes the check's shards with its TarWriter
#   deepspeed, built without its ops (they compile just in time on the GPU machine), and its
#     needs the image lacks (hjson, pydantic and pydantic's own)
#   transformers: accelerate's DeepSpeed plugin imports it whenever a plugin is selected
#     (set_deepspeed_weakref); check.sh installs it only where the image has none
#
#   bash tests/gpu/wheels.sh [DIR]     (DIR default: .whl in the repository)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$(realpath -m "${1:-$repo/.whl}")"
python="${PYTHON:-python3}"
# cp312 manylinux x86-64, as the GPU machine runs; one version of each (two stop the install)
wheels=(webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5
        annotated-types==0.7.0 typing-inspection==0.4.2 transformers==5.17.0)
deepspeed=deepspeed==0.19.8
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p "$dest"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "${wheels[@]}"
if ! ls "$dest"/deepspeed-*.whl >/dev/null 2>&1; then  # an sdist only: built here, pure Python
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$python" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$deepspeed"
    DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps -w "$dest" "$tmp"/deepspeed-*.tar.gz
fi
size=$(du -sm "$dest" | cut -f1)
echo "$dest: $(ls "$dest" | wc -l) wheels, ${size} MiB"
if [ "$size" -gt 40 ]; then
    echo "error: $dest holds ${size} MiB, more than the 40 MiB allowed" >&2; exit 1
fi
