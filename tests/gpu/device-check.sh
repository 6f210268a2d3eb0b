#!/bin/bash
# GPU check on a machine with a real NVIDIA GPU and no network. Run as an ordinary user
# (or root: hpcrun still runs unprivileged in a user namespace), with the images that
# tests/gpu/build-images.sh made on the development machine:
#   tests/gpu/device-check.sh [IMAGEDIR]      (default tests/gpu/images)
# HPCRUN_BIN: the hpcrun to test (default: this checkout, python3 -m hpcrun).
# Prints one PASS/FAIL/SKIP line per check; exits 1 if any failed.
set -u
here=$(cd "$(dirname "$0")" && pwd)
img=${1:-$here/images}
if [ -n "${HPCRUN_BIN:-}" ]; then hp=("$HPCRUN_BIN"); else hp=(env "PYTHONPATH=$here/../.." python3 -m hpcrun); fi
bb=$img/busybox-glibc.sif py=$img/debian-python.sif
failed=0
say() { printf '%s %s\n' "$1" "$2"; [ "$1" = FAIL ] && failed=1; return 0; }
check() {  # check NAME EXPECTED-REGEX CMD...: the command's output must match
    local name=$1 want=$2 out; shift 2
    out=$("$@" 2>&1)
    if [ $? -eq 0 ] && grep -Eq "$want" <<<"$out"; then say PASS "$name: $(tail -1 <<<"$out")"
    else say FAIL "$name: $(tr '\n' ' ' <<<"$out" | cut -c1-400)"; fi
}

echo "== host"
uname -r; nvidia-smi -L || { say FAIL "host nvidia-smi"; exit 1; }
"${hp[@]}" --version
"${hp[@]}" check 2>&1 | grep -E "NVIDIA|CDI|AMD"

echo "== --nv"
host=$(nvidia-smi -L)
inside=$("${hp[@]}" exec --nv "$bb" nvidia-smi -L 2>&1)
[ "$host" = "$inside" ] && say PASS "nvidia-smi -L inside = host's ($(wc -l <<<"$host") GPUs)" \
    || say FAIL "nvidia-smi -L: host [$host] inside [$inside]"
check "busybox+glibc: C probe (cuInit, count, cuMemAlloc, memcpy)" '^OK' "${hp[@]}" exec --nv "$bb" cudacheck
check "debian+python: ctypes (cuInit .. kernel launch)" '^OK .*kernel' "${hp[@]}" exec --nv "$py" python3 /opt/cuda_check.py
check "--containall --nv" '^OK .*kernel' "${hp[@]}" exec --containall --nv "$py" python3 /opt/cuda_check.py
check "LD_LIBRARY_PATH ends with the libs dir" '/\.singularity\.d/libs$' \
    "${hp[@]}" exec --nv "$bb" sh -c 'echo $LD_LIBRARY_PATH'
check "CUDA_VISIBLE_DEVICES=0 passes in" '^0$' \
    env CUDA_VISIBLE_DEVICES=0 "${hp[@]}" exec --cleanenv --nv "$bb" sh -c 'echo $CUDA_VISIBLE_DEVICES'
check "no --nv: no driver inside" 'FAIL dlopen' sh -c "! \"\$@\" exec \"$bb\" cudacheck" _ "${hp[@]}"
if command -v nvidia-container-cli >/dev/null; then
    check "--nvccli" '^OK .*kernel' "${hp[@]}" exec --nvccli "$py" python3 /opt/cuda_check.py
else say SKIP "--nvccli: no nvidia-container-cli here"; fi

echo "== CDI"
cdi=$(mktemp -d); trap 'rm -rf "$cdi"' EXIT
if command -v nvidia-ctk >/dev/null && nvidia-ctk cdi generate --output="$cdi/nvidia.yaml" >"$cdi/log" 2>&1; then
    check "CDI nvidia.com/gpu=all" '^OK .*kernel' \
        "${hp[@]}" exec --device nvidia.com/gpu=all --cdi-dirs "$cdi" "$py" python3 /opt/cuda_check.py
    check "CDI nvidia.com/gpu=0 under --containall" '^OK' \
        "${hp[@]}" exec --containall --device nvidia.com/gpu=0 --cdi-dirs "$cdi" "$bb" cudacheck
else say SKIP "CDI: nvidia-ctk cannot generate a spec here ($(tail -1 "$cdi/log" 2>/dev/null || echo 'not installed'))"; fi
exit $failed
