#!/usr/bin/env bash
# Download, HERE (where PyPI can be reached), the Python 3.12 wheels of the project's runtime
# dependencies that the GPU machine's image lacks, into .whl/ (git-ignored), so that
# benchmarks/gpu_session.sh can install them THERE, where nothing can be downloaded.
#
#   bash benchmarks/gpu_wheels.sh            # uses /work/main/.venv's versions (VENV=... to change)
#
# Which packages: [project].dependencies of pyproject.toml, minus those the GPU image already
# has (IMAGE_HAS below, from the device notes' list of the 'cuda' image, read 2026-11-17), each
# pinned to the version installed in $VENV (the versions the tests here run with). The extras
# (`evaluate`, `dev`) are not needed by the GPU checks. Then every Requires-Dist of the downloaded
# wheels (extras and markers evaluated for CPython 3.12 on Linux) must be downloaded too or in
# IMAGE_HAS, else the script fails and names it. Finally it checks that the wheels and the
# tracked files together stay well under the 64 MiB that may travel to the GPU machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-/work/main/.venv}
DEST=${DEST:-$ROOT/.whl}
PIP=${PIP:-python3 -m pip}
LIMIT_MIB=48 # of the 64 MiB that travel: leave room for untracked files and outputs

# On the image (normalized names). Carry one only for another version than the image's.
IMAGE_HAS="numpy torch safetensors pillow prometheus-client tqdm pytest packaging
typing-extensions pyyaml requests urllib3 certifi idna charset-normalizer filelock"

if [[ ! -x $VENV/bin/python ]]; then
    echo "no python in VENV=$VENV: point VENV at the environment the tests run with" >&2
    exit 2
fi

# name==version for each runtime dependency missing on the image, version from $VENV.
mapfile -t PINS < <(IMAGE_HAS="$IMAGE_HAS" "$VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import os, sys, tomllib
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

image = {canonicalize_name(n) for n in os.environ["IMAGE_HAS"].split()}
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
for dep in deps:
    name = canonicalize_name(Requirement(dep).name)
    if name not in image:
        print(f"{name}=={metadata.version(name)}")
EOF
)
echo "runtime dependencies missing on the GPU image: ${PINS[*]}"

rm -rf "$DEST"
mkdir -p "$DEST"
# One call per package: a pure-Python package has only a py3-none-any wheel, which the platform
# tags do not exclude; manylinux tags of several glibc levels, as pip matches each exactly.
# pylibjpeg-libjpeg 2.5.0 ships only manylinux_2_31/2_34 wheels for cp312: the image's Python
# 3.12.3 is Ubuntu 24.04's (glibc 2.39); gpu_session.sh prints the glibc it finds.
for pin in "${PINS[@]}"; do
    # shellcheck disable=SC2086  # PIP is a command with arguments
    $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 \
        --platform manylinux_2_31_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "$pin"
done

# Every requirement of a downloaded wheel is downloaded too or on the image; one version each.
IMAGE_HAS="$IMAGE_HAS" "$VENV/bin/python" - "$DEST" <<'EOF'
import os, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
image = {canonicalize_name(n) for n in os.environ["IMAGE_HAS"].split()}
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = [parse_wheel_filename(w.name)[0] for w in wheels]
if len(have) != len(set(have)):
    sys.exit(f"two versions of one package in {sys.argv[1]}: {have}")
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in have and name not in image:
            missing.append(f"{w.name} needs {req}")
if missing:
    sys.exit("not downloaded and not on the image:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels, their requirements all covered")
EOF

wheels_kib=$(du -sk "$DEST" | cut -f1)
tracked_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
total_mib=$(((wheels_kib + tracked_kib) / 1024))
ls -l "$DEST"
echo "wheels $((wheels_kib / 1024)) MiB + tracked files $((tracked_kib / 1024)) MiB = $total_mib MiB" \
    "(at most 64 MiB travel; this script allows $LIMIT_MIB)"
if ((total_mib > LIMIT_MIB)); then
    echo "too large to travel with room to spare" >&2
    exit 1
fi
