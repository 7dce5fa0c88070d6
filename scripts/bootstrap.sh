#!/usr/bin/env bash
# Installs what building and testing zt needs on a fresh Debian bookworm machine (docs/architecture.md, "Toolchain").
# Idempotent: each step checks first and only acts when something is missing.
set -euo pipefail

TOOLCHAIN=1.98.0
LLVM_DIR=/usr/lib/llvm-22

step() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: must run as root (apt-get, eBPF and network namespaces need it)" >&2
  exit 1
fi

need_pkgs=()
# g++: libFuzzer (cargo fuzz) is C++; make: jemalloc's C sources (the agent's allocator) build
# with it. iperf3 and haproxy: `cargo xtask bench` (its --quick
# smoke is part of the test suite). python3: the adversaries of the bypass tests.
for p in llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev iproute2 openssl tcpdump g++ make iperf3 haproxy python3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing Debian packages: ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
else
  step "Debian packages present"
fi

# promtool (tests check a live scrape with it); without recommends, so no server is installed.
if ! command -v promtool >/dev/null 2>&1; then
  step "installing Debian package prometheus (for promtool)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
else
  step "promtool present"
fi

if ! rustup toolchain list | grep -q "^${TOOLCHAIN}-"; then
  step "installing Rust toolchain ${TOOLCHAIN}"
  rustup toolchain install "$TOOLCHAIN" --profile minimal -c rust-src -c rustfmt -c clippy
else
  step "Rust toolchain ${TOOLCHAIN} present"
fi

if ! command -v bpf-linker >/dev/null 2>&1; then
  step "installing bpf-linker (built against LLVM 22, takes a few minutes)"
  PATH="$LLVM_DIR/bin:$PATH" LLVM_SYS_221_PREFIX="$LLVM_DIR" \
    cargo "+$TOOLCHAIN" install --locked bpf-linker --no-default-features --features llvm-22
else
  step "bpf-linker present"
fi

# cargo fuzz (the fuzz smoke in the test suite); the pinned toolchain builds the targets.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  step "installing cargo-fuzz"
  cargo "+$TOOLCHAIN" install --locked cargo-fuzz
else
  step "cargo-fuzz present"
fi

# A real kube-apiserver and etcd for the Kubernetes discovery tests, built from Go modules and
# cached (about 11 minutes the first time; the script checks the cached versions first).
step "kube-apiserver and etcd for the Kubernetes tests (scripts/kube-apiserver.sh)"
bash "$(dirname "$0")/kube-apiserver.sh" >/dev/null

# A real SPIRE server and agent for the tests of the SPIRE identity provider, built from Go
# modules and cached the same way (scripts/spire.sh).
step "spire-server and spire-agent for the SPIRE tests (scripts/spire.sh)"
bash "$(dirname "$0")/spire.sh" >/dev/null
