#!/usr/bin/env bash
# Issue 11's GPU checks in one command, for a machine with an NVIDIA GPU where nothing can be
# downloaded (the device tool's H200: Python 3.12 with torch, numpy, pytest, safetensors, pillow,
# prometheus-client and tqdm, but no pydicom, pynetdicom, structlog or pylibjpeg).
#
#   here, once:   bash benchmarks/gpu_wheels.sh          # the missing wheels into .whl/ (ignored)
#   there:        bash benchmarks/gpu_session.sh         # device tool: carry [".whl"], timeout 540
#
# Steps, each under `timeout` and all under one deadline (GPU_SESSION_BUDGET_S, 450 s), a failing
# step never stopping the later ones:
#   wheels   pip-install .whl/*.whl into /tmp/site (PYTHONPATH), no index, no dependencies
#   env      nvidia-smi, glibc, Python, torch/CUDA/cuDNN, the GPU, bf16, the packages' versions
#   tests    pytest -m gpu on the test files that have GPU tests (they skip without CUDA)
#   bench    benchmarks/bench_ltdiff_engine.py --devices cuda, GPU_SESSION_SLICES (512) slices
#   demo     the node end to end (python -m dicom_node.demo) with the LTDiff++ engine on cuda,
#            GPU_SESSION_DEMO_SLICES (300) slices: C-STORE in, engine, C-STORE out
#   bench-b64  the same benchmark with 64 slices per forward pass (the default on CUDA is 16)
#   bench-cpu  the same benchmark on the machine's CPU, 8 slices, for scale
# Everything goes to $OUT (the device tool's folder that comes back; ./gpu-session-out when
# unset): session.log (all output), tests.log, bench.log, demo.log, demo-side-by-side.png and
# summary.json (each step's status and time, the environment, the figures parsed from the logs).
# At most 8 files come back from the device machine: keep it so. Exit 0 only when every step
# passed (and, on a GPU run, CUDA was there and no GPU test was skipped).
#
# Rehearsal without a GPU (checks the script's logic, tiny sizes, CPU only):
#   GPU_SESSION_ALLOW_CPU=1 GPU_SESSION_PYTHON=/work/main/.venv/bin/python \
#     bash benchmarks/gpu_session.sh
# The wheels are installed only when .whl/ holds any (a 3.12 wheel does not install into 3.11).
set -u -o pipefail
export PYTHONUNBUFFERED=1

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-session-out}
PY=${GPU_SESSION_PYTHON:-python3}
WHEELS=${GPU_SESSION_WHEELS:-$ROOT/.whl}
ALLOW_CPU=${GPU_SESSION_ALLOW_CPU:-0}
BUDGET_S=${GPU_SESSION_BUDGET_S:-450}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")
SITE=$WORK/site # fresh each run: a rehearsal's 3.12 packages never reach another Python
STEPS=$WORK/steps.tsv
DEADLINE=$(($(date +%s) + BUDGET_S))

if [[ $ALLOW_CPU == 1 ]]; then
    DEVICE=cpu SLICES=${GPU_SESSION_SLICES:-2} SIZE=64 DEMO_SLICES=${GPU_SESSION_DEMO_SLICES:-2}
else
    DEVICE=cuda SLICES=${GPU_SESSION_SLICES:-512} SIZE=512
    DEMO_SLICES=${GPU_SESSION_DEMO_SLICES:-300}
fi

mkdir -p "$OUT" "$SITE"
: >"$STEPS"
exec > >(tee "$OUT/session.log") 2>&1
TEE_PID=$!

export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PY SITE WHEELS WORK OUT DEVICE SIZE DEMO_SLICES

# step NAME BUDGET_S LOG FUNCTION ARGS...: run the shell function under `timeout` (the smaller
# of BUDGET_S and what is left before the deadline; the whole process group is killed), its
# output to the terminal and appended to LOG; record the outcome.
step() {
    local name=$1 budget=$2 log=$3
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 20)); then
        echo "== $name: skipped, ${left} s left before the deadline"
        printf '%s\tskipped\t\t0\n' "$name" >>"$STEPS"
        return
    fi
    local limit=$((budget < left ? budget : left)) t0 rc status
    echo "== $name (at most ${limit} s): $*"
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" bash -c '"$@"' "$1" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
    esac
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "== $name: $status (exit $rc) in ${secs} s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" >>"$STEPS"
}

install_wheels() {
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    if ((${#wheels[@]} == 0)); then
        echo "no wheels in $WHEELS: the packages must already be importable"
        return 0
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
}

environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    ldd --version 2>&1 | head -1
    "$PY" - "$WORK/env.json" <<'EOF'
import json, platform, sys
from importlib import metadata

import torch

cuda = torch.cuda.is_available()
env = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if cuda else None,
    "cuda_available": cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
    "bf16": torch.cuda.is_bf16_supported() if cuda else None,
    "cpu_threads": torch.get_num_threads(),
    "packages": {},
}
for name in ("numpy", "pydicom", "pynetdicom", "structlog", "pylibjpeg", "pylibjpeg-libjpeg",
             "pylibjpeg-openjpeg", "pylibjpeg-rle", "safetensors", "pillow", "prometheus-client",
             "tqdm", "pytest"):
    try:
        env["packages"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        env["packages"][name] = None
import dicom_node, engine  # noqa: E401 (the checkout's packages, not an installed copy)
env["dicom_node_from"] = dicom_node.__file__
print(json.dumps(env, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(env, f)
missing = [n for n, v in env["packages"].items() if v is None]
if missing:
    sys.exit(f"missing packages: {missing}")
EOF
}

gpu_tests() {
    local files
    mapfile -t files < <(grep -rlE --include='test_*.py' 'pytest\.mark\.gpu' tests | sort)
    echo "test files with GPU tests: ${files[*]}"
    "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu "${files[@]}"
}

bench() { # DEVICES SLICES [extra args]
    local devices=$1 n=$2
    shift 2
    "$PY" benchmarks/bench_ltdiff_engine.py --devices "$devices" --slices "$n" --size "$SIZE" "$@"
}

demo() {
    rm -rf "$WORK/demo"
    "$PY" -m dicom_node.demo --out "$WORK/demo" --engine ltdiff --device "$DEVICE" \
        --slices "$DEMO_SLICES" --stable-age 1 --timeout 120 &&
        cp "$WORK/demo/demo-side-by-side.png" "$OUT/"
}

export -f install_wheels environment gpu_tests bench demo
echo "gpu_session: $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo no-git)," \
    "device $DEVICE, $SLICES bench slices, $DEMO_SLICES demo slices, budget ${BUDGET_S} s"
step wheels 60 "$WORK/wheels.log" install_wheels
step env 60 "$WORK/env.log" environment
step tests 120 "$OUT/tests.log" gpu_tests
step bench 150 "$OUT/bench.log" bench "$DEVICE" "$SLICES"
step demo 200 "$OUT/demo.log" demo
if [[ $DEVICE == cuda ]]; then
    step bench-b64 90 "$OUT/bench.log" bench cuda "$SLICES" --batch 64
    step bench-cpu 60 "$OUT/bench.log" bench cpu 8
fi

# summary.json: the steps, the environment and the figures the logs printed.
"$PY" - "$WORK" "$OUT" "$DEVICE" <<'EOF'
import json, re, sys
from pathlib import Path

work, out, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = {}
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, rc, secs = line.split("\t")
    steps[name] = {"status": status, "exit": int(rc) if rc else None, "seconds": float(secs)}
env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else None


def text(name):
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""


bench = [
    {"run": m[1], "engine_alone_slices_per_s": float(m[2]), "end_to_end_slices_per_s": float(m[3])}
    for m in re.finditer(
        r"^(\w+ \[.*?\] .*?)\n\s+engine alone: ([\d.]+) slices/s.*\n\s+end to end:\s+([\d.]+) "
        r"slices/s",
        text("bench.log"),
        re.M,
    )
]
tests = text("tests.log")
tests_line = next((ln for ln in reversed(tests.splitlines()) if re.search(r" in [\d.]+s", ln)), "")
demo = text("demo.log")
m = re.search(r"arrived in the archive: (\d+) images, ([\d.]+) s after", demo)
w = re.search(r"engine worker on '([^']+)': decode ([\d.]+) s, engine ([\d.]+) s, encode ([\d.]+)", demo)
s = re.search(r"sent (\d+) instances with C-STORE in ([\d.]+) s", demo)
summary = {
    "device": device,
    "steps": steps,
    "env": env,
    "gpu_tests": tests_line.strip("= "),
    "bench": bench,
    "demo": {
        "sent": int(s[1]) if s else None,
        "send_s": float(s[2]) if s else None,
        "images_back": int(m[1]) if m else None,
        "turnaround_s": float(m[2]) if m else None,
        "worker_device": w[1] if w else None,
        "decode_s": float(w[2]) if w else None,
        "engine_s": float(w[3]) if w else None,
        "encode_s": float(w[4]) if w else None,
    },
}
problems = [f"step {n}: {v['status']}" for n, v in steps.items() if v["status"] != "ok"]
if device == "cuda":
    if not (env and env.get("cuda_available")):
        problems.append("PyTorch sees no CUDA device")
    if "skipped" in tests_line or "passed" not in tests_line:
        problems.append(f"GPU tests: {tests_line or 'no result'}")
    if not any(b["run"].startswith("cuda") for b in bench):
        problems.append("no CUDA figures in bench.log")
    if summary["demo"]["worker_device"] != "cuda":
        problems.append("the demo's engine did not run on cuda")
summary["problems"] = problems
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
sys.exit(1 if problems else 0)
EOF
rc=$?
echo "gpu_session: $([[ $rc == 0 ]] && echo 'all checks passed' || echo 'PROBLEMS, see summary.json')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null # session.log complete before $OUT is read back
exit $rc
