#!/usr/bin/env bash
# Fetches the peer wheels that benchmarks/gpu_runbook.py installs on the offline GPU machine.
#
# Run it where the package registry is reachable (a developer machine), from anywhere:
#     bash benchmarks/fetch_wheels.sh
# It fills .whl/ at the repository root (git-ignored; the device tool carries it: carry [".whl"])
# with one wheel per peer, for the GPU machine's Python 3.12 on x86-64, and checks that every
# requirement of those wheels is preinstalled there (else it names what to add to PEERS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# The peers the benchmarks compare against, pinned: the versions the runbook was prepared with.
PEERS=("liger-kernel==0.8.5" "cut-cross-entropy==25.1.1")
# Preinstalled on the GPU machine (torch 2.11, Triton 3.6, ...): requirements outside it travel too.
PREINSTALLED="torch triton transformers safetensors tqdm matplotlib pyyaml numpy psutil pytest hypothesis peft accelerate pyarrow"

mkdir -p .whl
for spec in "${PEERS[@]}"; do
  name=${spec%%==*}
  # One version of each: two wheels of one package stop the whole offline install.
  rm -f ".whl/${name//-/_}"-*.whl
  # Both peers are pure-Python (py3-none-any) wheels, which these platform tags accept too.
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done

# Requires-Dist of every wheel (extras left out) against what the GPU machine has.
"$PYTHON" - "$PREINSTALLED" .whl/*.whl <<'PY'
import re
import sys
import zipfile

preinstalled = set(sys.argv[1].split())
missing = []
for path in sys.argv[2:]:
    with zipfile.ZipFile(path) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        for line in whl.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                req = line.split(":", 1)[1].strip()
                name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
                print(f"{path}: requires {req}" + ("" if name in preinstalled else "   <- NOT on the GPU machine"))
                if name not in preinstalled:
                    missing.append(name)
if missing:
    sys.exit(f"fetch_wheels.sh: add wheels for {sorted(set(missing))} to PEERS (the GPU machine cannot download them)")
PY
ls -l .whl
