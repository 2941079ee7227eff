#!/usr/bin/env bash
# Build the real Dockerfile and run the image as a user would: read-only root filesystem, a
# non-root user id, no network.  Also `make container-test`; tests/containers/ wraps it.
#
#   scripts/test_container.sh [--variant cpu|cuda] [--t1w HOST_T1W] [--keep]
#
# Steps:
#   1. Engine: podman (Debian's `podman`), else Docker where a daemon answers.
#   2. Base image python:3.11-slim-bookworm: the local one, else pulled, else (an air-gapped
#      build host) a local stand-in made from Debian packages with mmdebstrap (or debootstrap):
#      Debian bookworm, Debian's python3.11 and a venv at /usr/local, so that python, python3,
#      pip and pip3 are /usr/local/bin's as in the official image. Tagged with the official
#      name so that the Dockerfile's FROM resolves; labelled org.bids-cadiff.stand-in.
#   3. Build the Dockerfile with --build-arg TORCH_VARIANT=cpu (default; the published image is
#      TORCH_VARIANT=cuda). Prints the build time, the image size and its largest layers.
#   4. Run it with --read-only, --tmpfs /tmp, --user 1000:1000, --network=none:
#      --version; participant on a one-subject BIDS dataset (Colin27 from the image's
#      mricron-data, or --t1w); group; checks the reports (sub-*.html,
#      group/desc-cadiff_report.html), the outputs' owner (uid 1000), the container tag in
#      dataset_description.json (a warning where none is recorded), that BIDS_DIR is unchanged and that nothing was written to the container's own
#      filesystem (`<engine> diff`) besides the mount points of /tmp, the BIDS dir, OUTPUT_DIR
#      and the work dir.
#
# Exit status: 0 passed; 1 failed; 77 skipped: this machine cannot build or run containers (no
# engine, an engine that cannot start a container, no base image and no way to make one, no
# CPU torch to install, too little disk). The reason is the last line on stderr, "test_container.sh: SKIP: <reason>".
#
# Environment:
#   CADIFF_CONTAINER_ENGINE   podman or docker (default: podman if installed, else docker)
#   CADIFF_TEST_IMAGE         tag of the image built (default localhost/bids_cadiff:test-<variant>)
#   CADIFF_TORCH_WHEELS       podman only: a folder of wheels bound into the build, for a CPU
#                             torch wheel that is on disk (default: a folder of PIP_FIND_LINKS
#                             holding torch-<pin>+cpu-cp311-*.whl). Else PyTorch's CPU index.
#   CADIFF_BUILD_CA_BUNDLE    podman only: CA bundle for pip inside the build, for hosts behind
#                             a TLS-inspecting proxy (default: PIP_CERT, SSL_CERT_FILE,
#                             REQUESTS_CA_BUNDLE, else /etc/ssl/certs/ca-certificates.crt).
#   CADIFF_BASE_MIRROR        Debian mirror for the stand-in (default http://deb.debian.org/debian)
#   CADIFF_MIN_FREE_GB        free disk needed in the engine's storage (default 8 cpu, 25 cuda)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

variant=cpu
host_t1w=""
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variant="${2:-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    --variant=*) variant="${1#*=}"; shift ;;
    --t1w) host_t1w="${2:-}"; shift $(( $# > 1 ? 2 : 1 )) ;;
    --t1w=*) host_t1w="${1#*=}"; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "test_container.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$variant" in cpu|cuda) ;; *) echo "test_container.sh: --variant cpu or cuda" >&2; exit 2 ;; esac

BASE="python:3.11-slim-bookworm"
BASE_FQ="docker.io/library/${BASE}"
STANDIN_LABEL="org.bids-cadiff.stand-in"
IMAGE="${CADIFF_TEST_IMAGE:-localhost/bids_cadiff:test-${variant}}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' bids_cadiff/__init__.py)"
RUN_UID=1000
RUN_GID=1000

say() { echo "test_container.sh: $*"; }
skip() { echo "test_container.sh: SKIP: $*" >&2; exit 77; }
fail() { echo "test_container.sh: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
human() { awk -v b="$1" 'BEGIN { printf "%.2f GB (%d MB)", b / 1e9, b / 1e6 }'; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/cadiff-container-test.XXXXXX")"
# every container this script may start (some start in a subshell), removed on exit
containers=()
for step in version dataset participant group; do containers+=("cadiff-ct-$$-$step"); done
cleanup() {
  local c
  for c in "${containers[@]}"; do "${engine[@]}" rm -f "$c" >/dev/null 2>&1 || true; done
  if [ "$keep" = 1 ]; then
    say "kept $scratch"
  else
    # files written by uid 1000 in the container: removable by us (root or, rootless, via unshare)
    rm -rf "$scratch" 2>/dev/null || { [ "${engine[0]:-}" = podman ] \
      && podman unshare rm -rf "$scratch" 2>/dev/null; } || true
  fi
}
trap cleanup EXIT

# --------------------------------------------------------------------------- 1. engine
engine=()
engine_name="${CADIFF_CONTAINER_ENGINE:-}"
if [ -z "$engine_name" ]; then
  if command -v podman >/dev/null 2>&1; then engine_name=podman
  elif command -v docker >/dev/null 2>&1; then engine_name=docker
  else skip "no container engine: neither podman nor docker is installed (apt-get install podman)"
  fi
fi
command -v "$engine_name" >/dev/null 2>&1 || skip "$engine_name is not installed"
engine=("$engine_name")
if [ "$engine_name" = podman ]; then
  # Without systemd (containers, CI sandboxes): cgroupfs and a file for events, not journald.
  if [ ! -d /run/systemd/system ]; then
    engine+=(--cgroup-manager=cgroupfs --events-backend=file)
  fi
fi
if ! info_err="$("${engine[@]}" info 2>&1 >/dev/null)"; then
  skip "'${engine[*]} info' fails: $(echo "$info_err" | grep -v '^time=.*level=warning' | tail -n 1)"
fi
say "engine: $("${engine[@]}" --version)"

storage_dir() {
  if [ "$engine_name" = podman ]; then
    "${engine[@]}" info --format '{{.Store.GraphRoot}}' 2>/dev/null
  else
    "${engine[@]}" info --format '{{.DockerRootDir}}' 2>/dev/null
  fi
}
store="$(storage_dir || true)"
if [ -n "$store" ] && [ -d "$store" ]; then
  need_gb="${CADIFF_MIN_FREE_GB:-$([ "$variant" = cpu ] && echo 8 || echo 25)}"
  free_gb="$(df -P -B1G "$store" | awk 'NR == 2 { print $4 }')"
  if [ "$free_gb" -lt "$need_gb" ]; then
    skip "${free_gb} GB free in $store, the $variant image needs about $need_gb GB (CADIFF_MIN_FREE_GB)"
  fi
fi

image_exists() { "${engine[@]}" image inspect "$1" >/dev/null 2>&1; }

# --------------------------------------------------------------------------- 2. base image
make_standin() {
  # A local python:3.11-slim-bookworm: Debian bookworm (minbase, no docs, as debian:*-slim),
  # Debian's python3.11, a venv at /usr/local (python, python3, pip, pip3 on PATH first).
  local mirror="${CADIFF_BASE_MIRROR:-http://deb.debian.org/debian}"
  local security="${mirror%/debian}/debian-security"
  local pkgs="ca-certificates,netbase,tzdata,python3.11,python3.11-venv"
  local tar="$scratch/base.tar" root="$scratch/base-root"
  local t0; t0="$(now)"
  local excludes=(path-exclude=/usr/share/man/* path-exclude=/usr/share/doc/*
                  path-include=/usr/share/doc/*/copyright path-exclude=/usr/share/info/*
                  path-exclude=/usr/share/locale/* path-include=/usr/share/locale/locale.alias)
  if command -v mmdebstrap >/dev/null 2>&1; then
    local mode=root dpkgopts=() opt
    [ "$(id -u)" = 0 ] || mode=unshare
    for opt in "${excludes[@]}"; do dpkgopts+=(--dpkgopt="$opt"); done
    say "building it with mmdebstrap (bookworm, $pkgs) from $mirror"
    # shellcheck disable=SC2016  # "$1" is mmdebstrap's, expanded by its hook shell
    mmdebstrap --quiet --variant=minbase --mode="$mode" --format=tar --include="$pkgs" \
      --aptopt='APT::Install-Recommends "false"' "${dpkgopts[@]}" \
      --customize-hook='chroot "$1" python3.11 -m venv /usr/local' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/root/.cache' \
      bookworm "$tar" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
      "deb $security bookworm-security main" >"$scratch/mmdebstrap.log" 2>&1 \
      || { tail -n 20 "$scratch/mmdebstrap.log" >&2; return 1; }
  elif command -v debootstrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "building it with debootstrap (bookworm, $pkgs) from $mirror"
    mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
    printf '%s\n' "${excludes[@]}" > "$root/etc/dpkg/dpkg.cfg.d/01-slim"
    debootstrap --variant=minbase --include="$pkgs" bookworm "$root" "$mirror" \
      >"$scratch/debootstrap.log" 2>&1 || { tail -n 20 "$scratch/debootstrap.log" >&2; return 1; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
      "$mirror" "$mirror" "$security" > "$root/etc/apt/sources.list"
    chroot "$root" python3.11 -m venv /usr/local
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/root/.cache
    tar -C "$root" --numeric-owner -cf "$tar" .
    rm -rf "$root"
  else
    return 2
  fi
  "${engine[@]}" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL ${STANDIN_LABEL}=\"Debian bookworm python3.11 (venv at /usr/local), made by scripts/test_container.sh $(date -u +%Y-%m-%d)\"" \
    --change 'CMD ["python3"]' \
    "$tar" "$BASE_FQ" >/dev/null
  rm -f "$tar"
  say "stand-in $BASE_FQ made in $(since "$t0") s"
}

standin_note() {
  "${engine[@]}" image inspect --format "{{index .Config.Labels \"${STANDIN_LABEL}\"}}" "$BASE" \
    2>/dev/null | sed 's/^<no value>$//'
}

if image_exists "$BASE"; then
  note="$(standin_note || true)"
  if [ -n "$note" ]; then
    say "base $BASE: the LOCAL STAND-IN made earlier ($note), not the official image"
  else
    say "base $BASE: present locally"
  fi
else
  say "base $BASE: not present, pulling $BASE_FQ"
  if timeout 600 "${engine[@]}" pull "$BASE_FQ" >"$scratch/pull.log" 2>&1; then
    say "base $BASE: pulled"
  else
    say "cannot pull $BASE_FQ ($(grep -v '^Trying\|^Getting' "$scratch/pull.log" | tail -n 1))"
    say "making a LOCAL STAND-IN of $BASE from Debian packages (not the official image)"
    rc=0; make_standin || rc=$?
    case "$rc" in
      0) ;;
      2) skip "$BASE cannot be pulled and neither mmdebstrap nor (as root) debootstrap is installed to make a stand-in (apt-get install mmdebstrap)" ;;
      *) skip "$BASE cannot be pulled and making a stand-in failed (log above)" ;;
    esac
  fi
fi

# --------------------------------------------------------------------------- run options
# podman in a sandbox: crun refuses hybrid cgroup v1/v2 hosts ("cgroups in hybrid mode not
# supported"), and without CAP_SYS_RESOURCE the default rlimits (nofile 1048576, nproc 4194304)
# cannot be set ("setrlimit RLIMIT_NOFILE: Operation not permitted"). Try plain first, then
# runc, then rlimits at what this process may set, and keep the first that starts a container.
runtime_opts=()
if [ "$engine_name" = podman ]; then
  hard_nofile="$(ulimit -Hn)"; hard_nproc="$(ulimit -Hu)"
  [ "$hard_nofile" = unlimited ] && hard_nofile=1048576
  [ "$hard_nproc" = unlimited ] && hard_nproc=32768
  # podman lowers its own nproc limit to 32768 for conmon, which starts the runtime
  [ "$hard_nproc" -gt 32768 ] && hard_nproc=32768
  ulimits="--ulimit nofile=${hard_nofile}:${hard_nofile} --ulimit nproc=${hard_nproc}:${hard_nproc}"
  candidates=("" "$ulimits")
  if command -v runc >/dev/null 2>&1; then
    candidates+=("--runtime runc" "--runtime runc $ulimits")
  fi
else
  candidates=("")
fi
probe_err=""
found=0
for cand in "${candidates[@]}"; do
  # shellcheck disable=SC2206
  opts=($cand)
  if probe_err="$("${engine[@]}" run --rm --network=none "${opts[@]}" "$BASE" true 2>&1)"; then
    runtime_opts=("${opts[@]}"); found=1; break
  fi
done
if [ "$found" = 0 ]; then
  hint=""
  if echo "$probe_err" | grep -q 'hybrid mode'; then
    hint=" (crun cannot run on this hybrid cgroup host; apt-get install runc)"
  fi
  skip "'${engine[*]} run' cannot start a container here: $(echo "$probe_err" | tail -n 1)$hint"
fi
say "run options: ${runtime_opts[*]:-(none needed)}"

# --------------------------------------------------------------------------- 3. build
torch_pin="$(sed -n 's/^torch==//p' constraints.txt)"; torch_pin="${torch_pin%%+*}"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
build_opts=(--build-arg "TORCH_VARIANT=$variant" --build-arg "VERSION=$VERSION"
            --build-arg "CONTAINER_TAG=$IMAGE"
            --build-arg "VCS_REF=$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)"
            --build-arg "BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
if [ "$engine_name" = podman ]; then
  # --network=host: the build's apt and pip need the network; podman's bridge needs netavark
  # or CNI plugins and iptables, often missing in sandboxes, and the build isolates nothing
  # that the host network would expose.
  build_opts+=(--network=host "${runtime_opts[@]}")
  wheels="${CADIFF_TORCH_WHEELS:-}"
  if [ -z "$wheels" ] && [ "$variant" = cpu ]; then
    # a CPU torch wheel on disk: in pip's find-links (environment, then pip's configuration)
    links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
    for d in $links; do
      d="${d#file://}"
      if [ -d "$d" ] && compgen -G "$d/torch-${torch_pin}+cpu-cp311-*.whl" >/dev/null; then
        wheels="$d"; break
      fi
    done
  fi
  if [ -n "$wheels" ]; then
    build_opts+=(-v "$wheels:/tmp/cadiff-wheels:ro" --build-arg TORCH_WHEELS=/tmp/cadiff-wheels)
    say "torch wheels from $wheels (bound into the build)"
  fi
  ca="${CADIFF_BUILD_CA_BUNDLE:-${PIP_CERT:-${SSL_CERT_FILE:-${REQUESTS_CA_BUNDLE:-}}}}"
  [ -z "$ca" ] && [ -f /etc/ssl/certs/ca-certificates.crt ] && ca=/etc/ssl/certs/ca-certificates.crt
  if [ -n "$ca" ] && [ -f "$ca" ]; then
    build_opts+=(-v "$ca:/tmp/cadiff-build-ca.crt:ro" --build-arg PIP_CERT_FILE=/tmp/cadiff-build-ca.crt)
    say "pip inside the build trusts the host's CA bundle $ca"
  fi
fi
if [ "$variant" = cpu ] && [ -z "${wheels:-}" ]; then
  # no wheel on disk: the build gets torch==<pin>+cpu from PyTorch's CPU index
  if ! python3 - "$TORCH_CPU_INDEX/torch/" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=20)
PY
  then
    skip "no CPU-only torch==${torch_pin}+cpu for the build: $TORCH_CPU_INDEX cannot be reached and no wheel is on disk (CADIFF_TORCH_WHEELS=DIR, podman only)"
  fi
fi
say "building $IMAGE (TORCH_VARIANT=$variant) from $here/Dockerfile"
echo "+ ${engine[*]} build ${build_opts[*]} -t $IMAGE ." >&2
previous="$("${engine[@]}" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
t0="$(now)"
if ! "${engine[@]}" build "${build_opts[@]}" -t "$IMAGE" -f Dockerfile . >"$scratch/build.log" 2>&1; then
  tail -n 40 "$scratch/build.log" >&2
  fail "the image did not build (log above)"
fi
build_s="$(since "$t0")"
# the image this script built last time, untagged now: removed (its shared layers stay)
if [ -n "$previous" ] && [ "$previous" != "$("${engine[@]}" image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  "${engine[@]}" rmi "$previous" >/dev/null 2>&1 || true
fi
grep -E '^(torch |bids_cadiff )' "$scratch/build.log" || true
cached="$(grep -c -- '--> Using cache' "$scratch/build.log" || true)"
size="$("${engine[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
say "build time: ${build_s} s (${cached:-0} steps from the layer cache)"
say "image size: $(human "$size") ($IMAGE)"
say "layers (largest first):"
"${engine[@]}" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" 2>/dev/null \
  | awk -F'\t' '{ s = $1; gsub(/ /, "", s); v = s + 0; u = s; sub(/^[0-9.]+/, "", u)
                 m = (u == "GB") ? 1000 : (u == "MB") ? 1 : (u == "kB" || u == "KB") ? 0.001 : 0
                 c = $2; gsub(/  +/, " ", c); printf "%10.1f MB  %.100s\n", v * m, c }' \
  | sort -n -r | head -n 6 || true

# --------------------------------------------------------------------------- 4. run
mkdir -p "$scratch/bids" "$scratch/out" "$scratch/work"
chmod 0777 "$scratch/bids" "$scratch/out" "$scratch/work"
common=(--read-only --network=none --user "$RUN_UID:$RUN_GID" --tmpfs "/tmp:rw,size=4g,mode=1777")
if [ "$engine_name" = podman ]; then
  # podman's --read-only also mounts tmpfs on /run and /var/tmp by default; Docker does not.
  # Off, so that /tmp is the only writable place in the image, as with Docker.
  common+=(--read-only-tmpfs=false)
fi
common+=("${runtime_opts[@]}")

run_app() {  # run_app NAME [engine run options...] -- [app arguments...]
  local name="cadiff-ct-$$-$1"; shift
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  echo "+ ${engine[*]} run --name $name ${common[*]} ${opts[*]} $IMAGE $*" >&2
  "${engine[@]}" run --name "$name" "${common[@]}" "${opts[@]}" "$IMAGE" "$@"
}

# Nothing written into the container's own filesystem: `diff` lists what differs from the
# image; only the mount points may appear (created by the engine, empty in the image).
check_diff() {
  local name="cadiff-ct-$$-$1" bad
  bad="$("${engine[@]}" diff "$name" 2>&1 | awk '{ print $NF }' \
    | grep -v -x -E '/tmp|/data|/out|/work|/bids|/t1w(\.nii(\.gz)?)?|/run|/run/\.containerenv|/etc|/etc/(hosts|hostname|resolv\.conf)|/dev|/dev/.*|/proc|/sys' || true)"
  if [ -n "$bad" ]; then
    echo "$bad" | head -n 20 >&2
    fail "$1 wrote into the container's filesystem (${engine[0]} diff above)"
  fi
  "${engine[@]}" rm "$name" >/dev/null
}

# --version
t0="$(now)"
got="$(run_app version -- --version)" || fail "--version failed"
version_s="$(since "$t0")"
check_diff version
[ "$got" = "bids_cadiff $VERSION" ] || fail "--version printed '$got', expected 'bids_cadiff $VERSION'"
say "--version: '$got' in ${version_s} s"

# the BIDS dataset, made by the image's own Python (scripts/make_demo_dataset.py)
t1w_opts=(); t1w_args=()
if [ -n "$host_t1w" ]; then
  case "$host_t1w" in *.nii.gz) t1w_name=t1w.nii.gz ;; *) t1w_name=t1w.nii ;; esac
  t1w_opts=(-v "$(realpath "$host_t1w"):/$t1w_name:ro"); t1w_args=(--t1w "/$t1w_name")
fi
run_app dataset --entrypoint python3 -v "$scratch/bids:/bids" "${t1w_opts[@]}" -- \
  /opt/bids_cadiff/scripts/make_demo_dataset.py /bids "${t1w_args[@]}" \
  || fail "making the BIDS dataset in the image failed"
check_diff dataset
( cd "$scratch/bids" && find . -type f -exec sha256sum {} + | sort ) > "$scratch/bids.sha256"

mounts=(-v "$scratch/bids:/data:ro" -v "$scratch/out:/out" -v "$scratch/work:/work")

t0="$(now)"
run_app participant "${mounts[@]}" -- /data /out participant -w /work \
  || fail "the participant level failed (exit $?)"
participant_s="$(since "$t0")"
check_diff participant
say "participant: ${participant_s} s"

t0="$(now)"
run_app group "${mounts[@]}" -- /data /out group -w /work \
  || fail "the group level failed (exit $?)"
group_s="$(since "$t0")"
check_diff group
say "group: ${group_s} s"

# --------------------------------------------------------------------------- 5. outputs
reports=("$scratch"/out/sub-*.html)
[ -f "${reports[0]}" ] || fail "no participant report (OUTPUT_DIR/sub-*.html)"
[ -f "$scratch/out/group/desc-cadiff_report.html" ] || fail "no group report (group/desc-cadiff_report.html)"
compgen -G "$scratch/out/sub-*/anat/*_dseg.nii.gz" >/dev/null || fail "no segmentation (sub-*/anat/*_dseg.nii.gz)"
# GeneratedBy.Container.Tag: the image's CADIFF_CONTAINER_TAG (the CONTAINER_TAG build argument)
grep -q '"Container"' "$scratch/out/dataset_description.json" \
  || fail "dataset_description.json has no GeneratedBy.Container under ${engine_name}"
grep -q "\"$IMAGE\"" "$scratch/out/dataset_description.json" \
  || fail "dataset_description.json records another container tag than $IMAGE"
( cd "$scratch/bids" && find . -type f -exec sha256sum {} + | sort ) | cmp -s - "$scratch/bids.sha256" \
  || fail "the BIDS dataset changed"
if [ "$(id -u)" = 0 ]; then  # rootful: files on the host belong to the container's user id
  others="$(find "$scratch/out" "$scratch/work" ! -uid "$RUN_UID" -print | grep -v -x -F -e "$scratch/out" -e "$scratch/work" | head -n 5 || true)"
  [ -z "$others" ] || fail "files not owned by uid $RUN_UID: $others"
fi
say "outputs: $(find "$scratch/out" -type f | wc -l) files, reports $(basename "${reports[0]}") and group/desc-cadiff_report.html"

say "PASSED: engine=${engine_name} variant=${variant} build_s=${build_s} image_bytes=${size} version_s=${version_s} participant_s=${participant_s} group_s=${group_s}"
