#!/usr/bin/env bash
# The ftjob image: build it with docker or podman, whichever answers, and print its size.
#
#   docker/image.sh build    # `make image`; TORCH=cuda for torch's CUDA build
#   docker/image.sh engine   # only set up the engine; prints its name (exit 3: none can be set up here)
#   docker/image.sh lock     # `make lock`: regenerate docker/requirements.lock (commit the result)
#
# Settings (environment):
#   IMAGE            the tag (localhost/ftjob:latest); the image is also tagged ftjob:<version>, the
#                    image `ftjob launch k8s` names by default
#   TORCH            cpu (default) or cuda: torch's CPU build (about 2.3 GB image) or PyPI's CUDA build
#   TORCH_INDEX_URL  where torch comes from. Default: for cpu, download.pytorch.org/whl/cpu, or where that
#                    cannot be reached, a loopback index of the CPU wheel pip finds here; for cuda, PyPI
#   ENGINE           docker or podman (default: docker if its daemon answers, else podman)
#
# Machines that reach no container registry get what they lack, idempotently: as root on Debian,
# podman and runc from Debian's packages (with limits and a cgroup manager that work without systemd
# and without raising hard limits), and the base image made from Debian's packages (mmdebstrap),
# tagged as the Dockerfile's FROM. With podman the host's CA bundle is mounted for the build only
# (pip through a TLS-intercepting proxy), and builds run on the host network (no bridge, no iptables
# changes; a loopback torch index is reachable).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/ftjob:latest}"
TORCH="${TORCH:-cpu}"
CACHE="${FTJOB_IMAGE_CACHE:-/var/cache/ftjob-image}"
TORCH_INDEX_PORT="${FTJOB_TORCH_INDEX_PORT:-38517}"  # fixed: the index URL is part of the torch layer's cache key
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
PYPI=https://pypi.org/simple
PYTORCH_CPU=https://download.pytorch.org/whl/cpu
BASE="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' docker/Dockerfile | head -n 1)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' job/__init__.py)"
PODMAN_PACKAGES=(podman runc conmon uidmap fuse-overlayfs containernetworking-plugins
    golang-github-containers-common)

log() { echo "image: $*" >&2; }
die() { log "$*"; exit 1; }
no_engine() { log "no container engine can be set up here: $*"; exit 3; }

reachable() { curl -sS -o /dev/null --max-time 10 "$1" 2>/dev/null; }

need_pip() { python3 -m pip --version >/dev/null 2>&1 || die "$1 needs pip for python3 (python3 -m pip)"; }

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# podman's defaults ask for more open files and processes than the hard limits of a machine that
# cannot raise them, and crun refuses a hybrid cgroup layout: ask for the limits there are (podman caps
# its own process limit at pid_max), use runc, and cgroupfs where there is no systemd. Written only
# where there is no configuration yet.
configure_podman() {
    local conf=/etc/containers/containers.conf nofile nproc
    [[ -e $conf ]] && return
    nofile="$(ulimit -Hn)"
    nproc="$(ulimit -Hu)"
    if [[ $nproc == unlimited ]] || ((nproc > $(cat /proc/sys/kernel/pid_max))); then
        nproc="$(cat /proc/sys/kernel/pid_max)"
    fi
    mkdir -p /etc/containers
    cat > "$conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
EOF
    log "wrote $conf"
}

engine() {
    if [[ -n ${ENGINE:-} ]]; then
        command -v "$ENGINE" >/dev/null || no_engine "ENGINE=$ENGINE is not installed"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        ENGINE=docker
    else
        ENGINE=podman
    fi
    if [[ $ENGINE == podman ]] && ! command -v podman >/dev/null; then
        [[ $(id -u) -eq 0 ]] || no_engine "no docker daemon answers, podman is missing and installing it needs root"
        command -v apt-get >/dev/null || no_engine "no docker daemon answers and podman is missing (no apt-get to install it)"
        apt_install "${PODMAN_PACKAGES[@]}"
    fi
    if [[ $ENGINE == podman && $(id -u) -eq 0 ]]; then
        configure_podman
    fi
    "$ENGINE" info >/dev/null 2>&1 || die "$ENGINE does not answer: $ENGINE info"
}

# The Dockerfile's FROM, when the engine does not have it: pulled where a registry answers, otherwise
# made here from Debian's packages (Debian's Python 3.11 in /usr/bin instead of the official image's
# /usr/local build: the Dockerfile works on both).
base_image() {
    "$ENGINE" image inspect "$BASE" >/dev/null 2>&1 && return
    if reachable https://registry-1.docker.io/v2/; then
        "$ENGINE" pull "$BASE"
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "$BASE: no registry answers, and making it here (mmdebstrap) needs root"
    apt_install mmdebstrap
    log "no registry answers: making $BASE from Debian's packages"
    local tar="$CACHE/base.tar"
    mkdir -p "$CACHE"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' bookworm "$tar" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    "$ENGINE" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$BASE" >/dev/null
    rm -f "$tar"
}

# A PEP 503 index on loopback holding the CPU torch wheel that pip finds here (a wheel folder or index
# in pip's configuration); torch's dependencies come from PyPI. Sets TORCH_INDEX_URL; the server stops
# with this script.
serve_local_torch_index() {
    local root="$CACHE/torch-index" wheel
    if ! compgen -G "$root/torch/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null; then
        need_pip "a local torch index"
        mkdir -p "$root/torch"
        python3 -m pip download -qq --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 --dest "$root/torch" "torch==$TORCH_VERSION+cpu" ||
            die "no CPU build of torch $TORCH_VERSION reaches pip here: set TORCH_INDEX_URL"
    fi
    wheel="$(basename "$(compgen -G "$root/torch/torch-$TORCH_VERSION+cpu-*.whl" | head -n 1)")"
    printf '<a href="%s">%s</a>\n' "$wheel" "$wheel" > "$root/torch/index.html"
    printf '<a href="torch/">torch</a>\n' > "$root/index.html"
    python3 -m http.server "$TORCH_INDEX_PORT" --bind 127.0.0.1 --directory "$root" >/dev/null 2>&1 &
    INDEX_SERVER=$!
    trap 'kill "$INDEX_SERVER" 2>/dev/null || true' EXIT
    TORCH_INDEX_URL="http://127.0.0.1:$TORCH_INDEX_PORT/"
    for _ in $(seq 50); do
        reachable "$TORCH_INDEX_URL" && return
        sleep 0.1
    done
    die "the loopback torch index did not start on port $TORCH_INDEX_PORT (FTJOB_TORCH_INDEX_PORT)"
}

torch_index() {
    [[ -n ${TORCH_INDEX_URL:-} ]] && return
    case "$TORCH" in
        cuda) TORCH_INDEX_URL="$PYPI" ;;
        cpu) if reachable "$PYTORCH_CPU/"; then TORCH_INDEX_URL="$PYTORCH_CPU"; else serve_local_torch_index; fi ;;
        *) die "TORCH=$TORCH: cpu or cuda" ;;
    esac
}

source_url() {  # the repository's address for the image's label, without any credentials in it
    git config --get remote.origin.url 2>/dev/null | sed -E 's#//[^/@]*@#//#' || true
}

build() {
    TORCH_VERSION="$(sed -n 's/^torch==//p' docker/requirements.lock)"
    engine
    base_image
    torch_index
    local commit options=()
    commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then
        log "warning: the checkout has uncommitted changes; the image is labelled with commit $commit"
    fi
    if [[ $ENGINE == podman ]]; then
        options+=(--pull=never --network=host)
        [[ -f $CA_BUNDLE ]] && options+=(--volume "$CA_BUNDLE:$CA_BUNDLE:ro")
    elif [[ $TORCH_INDEX_URL == http://127.0.0.1:* ]]; then
        options+=(--network=host)
    fi
    local torch="$TORCH_VERSION"
    [[ $TORCH == cpu ]] && torch+="+cpu"  # only the CPU build: never PyPI's CUDA one by mistake
    log "building $IMAGE with $ENGINE: torch $torch from $TORCH_INDEX_URL"
    local start=$SECONDS
    "$ENGINE" build "${options[@]}" -f docker/Dockerfile -t "$IMAGE" -t "ftjob:$VERSION" \
        --build-arg TORCH_VERSION="$torch" \
        --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
        --build-arg FTJOB_VERSION="$VERSION" \
        --build-arg FTJOB_GIT_COMMIT="$commit" \
        --build-arg FTJOB_IMAGE="$IMAGE" \
        --build-arg FTJOB_SOURCE="$(source_url)" \
        .
    local size
    size="$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")"
    log "built $IMAGE (also ftjob:$VERSION) in $((SECONDS - start)) s: torch $torch, $(awk -v s="$size" \
        'BEGIN { printf "%.2f GB", s / 1e9 }')"
}

# The lock: every package the image installs besides ftjob, resolved from PyPI (torch's CPU build from
# its index) for the image's Python, pinned to one version each. torch is pinned without its build
# label: the same version comes as +cpu or from PyPI with CUDA.
lock() {
    python3 -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null ||
        die "the image's Python is 3.11: run with a python3 of that version first on PATH"
    need_pip "make lock"
    TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/.*torch==\([0-9.]*\).*/\1/p' Makefile | head -n 1)}"
    TORCH=cpu
    torch_index
    local report
    report="$(mktemp)"
    # No pip configuration file: its extra indexes (mirrors here) are not where the image installs from.
    PIP_CONFIG_FILE=/dev/null python3 -m pip install --quiet --dry-run --ignore-installed --report "$report" \
        --index-url "$PYPI" --extra-index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION+cpu" .
    python3 - "$report" > docker/requirements.lock <<'EOF'
import json
import re
import sys

installs = json.load(open(sys.argv[1]))["install"]
print("# What the image installs besides ftjob, one version each. Generated by `make lock` (docker/image.sh")
print("# lock) from pyproject.toml's dependencies and the Makefile's torch; do not edit by hand.")
pins = sorted(
    (re.sub(r"[-_.]+", "-", i["metadata"]["name"]).lower(), i["metadata"]["version"].split("+")[0])
    for i in installs
)
print("\n".join(f"{name}=={version}" for name, version in pins if name != "ftjob"))
EOF
    rm -f "$report"
    log "wrote docker/requirements.lock ($(grep -c '==' docker/requirements.lock) packages)"
}

case "${1:-build}" in
    build) build ;;
    engine) engine && echo "$ENGINE" ;;
    lock) lock ;;
    *) echo "usage: $0 build|engine|lock" >&2; exit 2 ;;
esac
