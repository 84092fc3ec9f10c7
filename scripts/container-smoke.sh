#!/usr/bin/env bash
# Build the image from ./Dockerfile with Podman and run both of its jobs for real:
#   1. `predict` over a folder of real images (read-only input volume, read-only root file system,
#      the image's non-root user); every mask is checked; a second run must recompute nothing;
#      a folder with a corrupt image must exit non-zero with the failure in summary.json;
#      a custom model mounted with SEG_MODEL must be the one used, under --user;
#   2. the service: started with the default command, its HEALTHCHECK run, an image POSTed.
# Prints the image size and the start-up times, then removes its containers and the image.
#
# Skips (exit 0) with a message where podman is missing. Needs root, Debian's mirror and PyPI.
# When the base image (debian:bookworm-slim) is not in Podman's store, it is made with debootstrap
# (no registry needed) and cached as a tar in $SEG_SMOKE_DIR (default /var/tmp/seg-smoke).
#
#   scripts/container-smoke.sh                 # or: make container-smoke
#   SEG_SMOKE_KEEP=1 scripts/container-smoke.sh  # keep the image (localhost/seg:smoke) afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v podman > /dev/null; then
    echo "container smoke test skipped: podman is not installed (apt-get install podman runc debootstrap)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "container smoke test skipped: it runs Podman as root (it chowns volumes to the image's users)"
    exit 0
fi

WORK=${SEG_SMOKE_DIR:-/var/tmp/seg-smoke}
IMAGE=localhost/seg:smoke
BASE=docker.io/library/debian:bookworm-slim
MIRROR=${SEG_SMOKE_MIRROR:-http://deb.debian.org/debian}
PORT=${SEG_SMOKE_PORT:-3917}
NAME=seg-smoke-$$
UID_IN_IMAGE=10001

mkdir -p "$WORK"
RUN=$(mktemp -d "$WORK/run.XXXXXX")
printf '[containers]\ndefault_ulimits = []\n' > "$WORK/containers.conf"
export CONTAINERS_CONF="$WORK/containers.conf"

podman() { command podman --runtime runc --cgroup-manager=cgroupfs "$@"; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "container smoke test FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

cleanup() {
    podman rm -f "$NAME-svc" > /dev/null 2>&1 || true
    if [ -z "${SEG_SMOKE_KEEP:-}" ]; then
        podman rmi -f "$IMAGE" > /dev/null 2>&1 || true
        # The build stage's untagged image, made by this run only.
        comm -13 "$RUN/dangling-before.txt" <(podman images -q -f dangling=true | sort) 2> /dev/null \
            | xargs -r podman rmi -f > /dev/null 2>&1 || true
    fi
    rm -rf "$RUN"
}
trap cleanup EXIT

step "base image $BASE"
if podman image exists "$BASE"; then
    echo "present"
elif [ -f "$WORK/base.tar" ]; then
    podman load -q -i "$WORK/base.tar"
else
    command -v debootstrap > /dev/null || fail "no $BASE and no debootstrap to make it (apt-get install debootstrap)"
    rootfs="$RUN/rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" > "$RUN/debootstrap.log" 2>&1 \
        || { tail -20 "$RUN/debootstrap.log"; fail "debootstrap"; }
    # As the published slim image: no package lists or caches.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*
    tar -C "$rootfs" -c . | podman import -q - "$BASE" > /dev/null
    rm -rf "$rootfs"
    podman save -q -o "$WORK/base.tar" "$BASE"
    echo "made with debootstrap from $MIRROR, cached in $WORK/base.tar"
fi

step "build $IMAGE"
build_args=(--network=host --pull=never --format docker -t "$IMAGE")
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    # This machine's CA bundle for pip inside the build (some networks intercept TLS).
    printf '[global]\ncert = /run/host-ca.crt\n' > "$RUN/pip.conf"
    build_args+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$RUN/pip.conf:/etc/pip.conf:ro")
fi
podman images -q -f dangling=true | sort > "$RUN/dangling-before.txt"
start=$(now)
podman build "${build_args[@]}" . > "$RUN/build.log" 2>&1 || { tail -30 "$RUN/build.log"; fail "build"; }
build_s=$(since "$start")
size_mb=$(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{ printf "%.0f", $1 / 1e6 }')
base_mb=$(podman image inspect "$BASE" --format '{{.Size}}' | awk '{ printf "%.0f", $1 / 1e6 }')
echo "built in ${build_s} s: ${size_mb} MB (base ${base_mb} MB)"
podman run --rm --no-healthcheck --user 0 --entrypoint /opt/seg/bin/python "$IMAGE" -c "
import importlib.util as u, pathlib, shutil, sys
left = [name for name in ('torch', 'pip') if u.find_spec(name)] + [c for c in ('gcc', 'cc', 'g++') if shutil.which(c)]
left += [str(p) for p in (pathlib.Path('/root/.cache'), pathlib.Path('/var/lib/apt/lists/partial')) if p.exists()]
sys.exit(f'left in the image: {left}' if left else 0)"
echo "no torch, pip, compilers or caches in the image"

run() { podman run --rm --no-healthcheck --network=host "$@"; }
start=$(now)
run "$IMAGE" --help > /dev/null
help_s=$(since "$start")

# Check masks with the image's own Python (it has numpy and Pillow): MASKS IMAGES [EXPECT_N].
check_masks() {
    run -i -v "$1:/out:ro" -v "$2:/in:ro" --entrypoint /opt/seg/bin/python "$IMAGE" - "${3:-0}" << 'EOF'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image

summary = json.loads(Path("/out/summary.json").read_text())
expected = int(sys.argv[1])
inputs = sorted(p for p in Path("/in").iterdir() if p.suffix in {".png", ".tif"} and "broken" not in p.name)
for source in inputs:
    mask = Image.open(Path("/out") / f"{source.stem}.png")
    image = Image.open(source)
    assert mask.size == image.size, (source.name, mask.size, image.size)
    assert mask.mode == "P", (source.name, mask.mode)
    values = np.asarray(mask)
    assert set(np.unique(values)) <= {0, 1}, (source.name, np.unique(values))
    membrane = float((values == summary["classes"].index("membrane")).mean())  # about a fifth of a slice
    assert 0.05 < membrane < 0.5, (source.name, membrane)
    print(f"  {source.name}: {mask.size[0]}x{mask.size[1]}, membrane {membrane:.1%}")
assert len(inputs) >= expected, (len(inputs), expected)
print(json.dumps({k: summary[k] for k in ("ok", "skipped", "failed", "model")}))
EOF
}

step "batch prediction: read-only input, read-only root file system, user $UID_IN_IMAGE"
mkdir -p "$RUN/in" "$RUN/out"
cp data/samples/*.png "$RUN/in/"
n_inputs=$(find "$RUN/in" -type f | wc -l)
chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$RUN/out"
start=$(now)
run --read-only -v "$RUN/in:/in:ro" -v "$RUN/out:/out" "$IMAGE" predict /in --out /out
predict_s=$(since "$start")
check_masks "$RUN/out" "$RUN/in" "$n_inputs" | tee "$RUN/check1.txt"
grep -q "\"ok\": $n_inputs, \"skipped\": 0, \"failed\": 0" "$RUN/check1.txt" || fail "first run did not predict every image"
unexpected=$(find "$RUN/out" -type f ! -name '*.png' ! -name summary.json)
[ -z "$unexpected" ] || fail "files other than masks and summary.json under /out: $unexpected"

step "the same run again: nothing recomputed"
stat -c '%n %Y %s' "$RUN"/out/*.png > "$RUN/before.txt"
start=$(now)
run --read-only -v "$RUN/in:/in:ro" -v "$RUN/out:/out" "$IMAGE" predict /in --out /out
rerun_s=$(since "$start")
stat -c '%n %Y %s' "$RUN"/out/*.png > "$RUN/after.txt"
cmp -s "$RUN/before.txt" "$RUN/after.txt" || fail "masks were rewritten on the second run"
check_masks "$RUN/out" "$RUN/in" | tee "$RUN/check2.txt"
grep -q "\"ok\": 0, \"skipped\": $n_inputs, \"failed\": 0" "$RUN/check2.txt" || fail "second run recomputed"

step "a corrupt input: exit code 1, reported in summary.json, the others predicted"
mkdir -p "$RUN/bad" "$RUN/out-bad"
cp data/samples/isbi_test_00.png "$RUN/bad/"
head -c 2000 data/samples/isbi_test_01.png > "$RUN/bad/broken.png"
chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$RUN/out-bad"
code=0
run --read-only -v "$RUN/bad:/in:ro" -v "$RUN/out-bad:/out" "$IMAGE" predict /in --out /out 2> "$RUN/bad.log" || code=$?
cat "$RUN/bad.log"
[ "$code" = 1 ] || fail "exit code $code with a corrupt input, expected 1"
grep -q "1 predicted, 0 skipped, 1 failed" "$RUN/bad.log" || fail "the summary line is missing"
grep -q '"failed": 1' "$RUN/out-bad/summary.json" || fail "summary.json does not count the failure"

step "a custom model mounted and named by SEG_MODEL, run as another user (--user)"
mkdir -p "$RUN/models" "$RUN/out-custom"
cp seg/assets/model.onnx "$RUN/models/custom.onnx"
chown 4321:4321 "$RUN/out-custom"
run --read-only --user 4321:4321 -e SEG_MODEL=/models/custom.onnx -v "$RUN/models:/models:ro" -v "$RUN/in:/in:ro" \
    -v "$RUN/out-custom:/out" "$IMAGE" predict /in --out /out 2> /dev/null
grep -q '"model": "/models/custom.onnx"' "$RUN/out-custom/summary.json" || fail "SEG_MODEL was not used"
[ "$(stat -c %u "$RUN/out-custom/isbi_test_00.png")" = 4321 ] || fail "masks not owned by the --user"

step "the service (default command) on port $PORT"
start=$(now)
# Podman without systemd cannot schedule the HEALTHCHECK (it logs that); it is run by hand below.
podman run -d --name "$NAME-svc" --network=host --read-only --tmpfs /tmp -e SEG_PORT="$PORT" "$IMAGE" \
    > /dev/null 2> "$RUN/service-start.log" || { cat "$RUN/service-start.log"; fail "the service did not start"; }
ready=""
for _ in $(seq 1 120); do
    if curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; then ready=1; break; fi
    sleep 0.25
done
ready_s=$(since "$start")
[ -n "$ready" ] || { podman logs "$NAME-svc" | tail -30; fail "service not ready after 30 s"; }
echo "ready in ${ready_s} s"
podman healthcheck run "$NAME-svc" 2> /dev/null || fail "HEALTHCHECK failed"
echo "HEALTHCHECK: healthy"
podman exec "$NAME-svc" id -u | grep -qx "$UID_IN_IMAGE" || fail "the service does not run as user $UID_IN_IMAGE"
start=$(now)
code=$(curl -s -o "$RUN/posted.png" -w '%{http_code}' -F image=@data/samples/isbi_test_02.png "http://127.0.0.1:$PORT/segment")
post_s=$(since "$start")
[ "$code" = 200 ] || fail "POST /segment answered $code: $(head -c 300 "$RUN/posted.png")"
mkdir -p "$RUN/posted"
mv "$RUN/posted.png" "$RUN/posted/isbi_test_02.png"
run -v "$RUN/posted:/out:ro" -v "$RUN/out:/in:ro" --entrypoint /opt/seg/bin/python "$IMAGE" -c '
import numpy as np
from PIL import Image
served, batch = Image.open("/out/isbi_test_02.png"), Image.open("/in/isbi_test_02.png")
assert served.size == batch.size and served.mode == "P", (served.size, served.mode)
agree = (np.asarray(served) == np.asarray(batch)).mean()
assert agree > 0.999, agree  # the service and the batch job predict through the same tiled predictor
print("  POST /segment: %dx%d palette PNG, %.2f%% of pixels as the batch mask" % (*served.size, 100 * agree))
'
code=$(curl -s -o "$RUN/error.json" -w '%{http_code}' --data-binary @"$RUN/bad/broken.png" "http://127.0.0.1:$PORT/segment")
[ "${code:0:1}" = 4 ] && grep -q '"error"' "$RUN/error.json" || fail "a corrupt upload answered $code: $(cat "$RUN/error.json")"
echo "  corrupt upload: $code $(cat "$RUN/error.json")"
podman stop -t 10 "$NAME-svc" > /dev/null 2>&1

step "figures"
printf '  image size:             %s MB (base %s MB)\n' "$size_mb" "$base_mb"
printf '  build:                  %s s\n' "$build_s"
printf '  `seg --help` (start-up): %s s\n' "$help_s"
printf '  predict, %d images:      %s s (again, all skipped: %s s)\n' "$n_inputs" "$predict_s" "$rerun_s"
printf '  service ready:          %s s after `run`; POST /segment (512x512): %s s\n' "$ready_s" "$post_s"
echo "container smoke test passed"
