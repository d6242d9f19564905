#!/usr/bin/env bash
# The ARM check: a small CBAM bundle exported here (x86-64), its ONNX, OpenVINO, ncnn and ExecuTorch
# artifacts (fp32 and int8) run by the aarch64 builds of their runtimes under user-mode emulation
# (qemu-aarch64, the emulated CPU pinned), each compared with PyTorch on this machine.
#
#   scripts/arm_check.sh [--cpu CPU ...] [--json FILE] [--setup-only]     (default: --cpu cortex-a76 --cpu cortex-a57)
#
# Everything it fetches goes into a cache folder (CBAM_DEPLOY_ARM_CACHE, default
# ~/.cache/cbam-deploy/arm), never into the repository, and each step is skipped when its result is
# there already:
#   qemu-aarch64   Debian trixie's qemu-user (static; 10.x emulates /proc/cpuinfo for the guest, which
#                  onnxruntime's and ncnn's CPU detection read; bookworm's 7.2 shows the host's)
#   sysroot/       Debian bookworm arm64: python3.11, glibc 2.36, libstdc++, libgomp, unpacked from
#                  the .debs with dpkg-deb (apt-get with a private state folder: no chroot, nothing
#                  installed on this machine)
#   site-<key>/    the aarch64 wheels of torch, onnxruntime, OpenVINO, ncnn, ExecuTorch, ... at the
#                  versions this venv has, installed by this machine's pip for the aarch64 platform
# It needs apt-get (Debian or Ubuntu), network access to Debian's archive and PyPI the first time,
# and the project's venv (make install). About 6 GB in the cache (torch's aarch64 wheel on PyPI is
# a CUDA build and brings NVIDIA's libraries, which the CPU never uses but its import loads).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CBAM_DEPLOY_ARM_CACHE:-$HOME/.cache/cbam-deploy/arm}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SETUP_ONLY=0
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --setup-only) SETUP_ONLY=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done

[ -x "$PYTHON" ] || { echo "error: no $PYTHON: run 'make install' first (or set PYTHON)" >&2; exit 2; }
command -v apt-get >/dev/null || { echo "error: apt-get not found: the ARM check fetches Debian packages" >&2; exit 2; }
mkdir -p "$CACHE"
log() { echo "arm_check: $*" >&2; }

# apt-get for another suite/architecture, with its own lists, cache and an empty dpkg status
apt_private() {  # apt_private DIR SUITE ARCH apt-get-args...
  local dir="$1" suite="$2" arch="$3"; shift 3
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/etc/preferences.d"
  touch "$dir/status"
  echo "deb [arch=$arch signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    > "$dir/etc/sources.list"
  apt-get -q -o Dir::Etc::SourceList="$dir/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
    -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$dir/etc/preferences.d" \
    -o Dir::State::Lists="$dir/lists" -o Dir::State::status="$dir/status" -o Dir::Cache="$dir" \
    -o Dir::Cache::Archives="$dir/archives" -o APT::Architecture="$arch" -o APT::Architectures::="$arch" \
    -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}

# --- 1. the emulator --------------------------------------------------------------------------
QEMU="$CACHE/qemu/qemu-aarch64"
if [ ! -x "$QEMU" ]; then
  log "fetching qemu-user (Debian trixie) ..."
  [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || { echo "error: Debian's archive keyring is missing (apt-get install debian-archive-keyring)" >&2; exit 2; }
  apt_private "$CACHE/apt-trixie" trixie amd64 update >/dev/null
  (cd "$CACHE/apt-trixie/archives" && apt_private "$CACHE/apt-trixie" trixie amd64 download qemu-user >/dev/null)
  mkdir -p "$CACHE/qemu.tmp"
  dpkg-deb --fsys-tarfile "$CACHE"/apt-trixie/archives/qemu-user_*.deb | tar -x -C "$CACHE/qemu.tmp" ./usr/bin/qemu-aarch64
  mv "$CACHE/qemu.tmp/usr/bin/qemu-aarch64" "$CACHE/qemu.tmp/qemu-aarch64" && rm -rf "$CACHE/qemu.tmp/usr"
  rm -rf "$CACHE/qemu" && mv "$CACHE/qemu.tmp" "$CACHE/qemu"
  rm -f "$CACHE"/apt-trixie/archives/*.deb
fi

# --- 2. the arm64 sysroot ---------------------------------------------------------------------
SYSROOT="$CACHE/sysroot"
if [ ! -f "$SYSROOT/.complete" ]; then
  log "fetching the arm64 sysroot (Debian bookworm: python3.11, glibc, libstdc++, libgomp) ..."
  apt_private "$CACHE/apt-arm64" bookworm arm64 update >/dev/null
  apt_private "$CACHE/apt-arm64" bookworm arm64 -y --download-only --no-install-recommends \
    install python3.11 libstdc++6 libgomp1 zlib1g >/dev/null
  rm -rf "$SYSROOT.tmp" && mkdir -p "$SYSROOT.tmp"
  for deb in "$CACHE"/apt-arm64/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT.tmp"; done
  touch "$SYSROOT.tmp/.complete"
  rm -rf "$SYSROOT" && mv "$SYSROOT.tmp" "$SYSROOT"
  rm -f "$CACHE"/apt-arm64/archives/*.deb
fi

# --- 3. the aarch64 Python packages, at this venv's versions ----------------------------------
# pip resolves torch's dependency set (NVIDIA's libraries included) for aarch64; the edge runtimes
# go in without their dependency sets, as requirements/edge.txt does on x86.
PINS="$("$PYTHON" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
with_deps = ["torch", "numpy", "onnx", "onnxruntime", "openvino", "psutil"]
no_deps = ["ncnn", "portalocker", "tqdm", "executorch", "torchao", "flatbuffers", "ruamel.yaml", "tabulate"]
def pins(names):
    out = []
    for name in names:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return " ".join(out)
print(pins(with_deps) + "|" + pins(no_deps))
EOF
)"
WITH_DEPS="${PINS%%|*}"
NO_DEPS="${PINS##*|}"
KEY="$(printf '%s\n' "$PINS" | sha256sum | cut -c1-12)"
SITE="$CACHE/site-$KEY"
if [ ! -f "$SITE/.complete" ]; then
  log "installing aarch64 wheels into $SITE (torch's brings ~2 GB of NVIDIA libraries; minutes) ..."
  PLATFORMS=(--platform manylinux2014_aarch64)
  for minor in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${minor}_aarch64"); done  # glibc 2.36
  PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "${PLATFORMS[@]}"
       --python-version 3.11 --implementation cp --abi cp311)
  rm -rf "$SITE.tmp"
  # shellcheck disable=SC2086
  "${PIP[@]}" --target "$SITE.tmp/deps" $WITH_DEPS
  # shellcheck disable=SC2086
  "${PIP[@]}" --no-deps --target "$SITE.tmp/edge" $NO_DEPS
  touch "$SITE.tmp/.complete"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
fi

if [ "$SETUP_ONLY" = 1 ]; then
  log "ready: $QEMU, $SYSROOT, $SITE"
  exit 0
fi
exec "$PYTHON" "$ROOT/scripts/arm_check.py" --qemu "$QEMU" --sysroot "$SYSROOT" \
  --site "$SITE/edge:$SITE/deps" --cache "$CACHE" ${ARGS[@]+"${ARGS[@]}"}
