#!/usr/bin/env bash
# Builds a real kube-apiserver and etcd from Go modules (the only source reachable here) and
# caches them in ${ZT_CACHE:-$HOME/.cache/zt}/k8s/<k8s version>/; prints that directory.
# Idempotent: when both cached binaries report the pinned versions it builds nothing.
#
#   dir=$(scripts/kube-apiserver.sh) && "$dir/etcd" ... && "$dir/kube-apiserver" ...
#
# Why a local module: `go install k8s.io/kubernetes/cmd/kube-apiserver@vX` is refused because
# kubernetes' go.mod replaces its staging modules (k8s.io/api, apiserver, ...) with ./staging
# paths. A small module that requires k8s.io/kubernetes and replaces each of those staging
# modules with its published v0.Y.Z twin builds the same code. etcd's server module has replace
# directives too (../api, ../pkg, ...), so it gets the same treatment.
#
# Environment: ZT_CACHE, ZT_K8S_VERSION, ZT_ETCD_VERSION, GOTOOLCHAIN (default here: auto, so a
# go.mod asking for a newer Go fetches it from the module proxy), ZT_KEEP_GOCACHE=1 keeps the
# Go build cache (about 3 GiB) after a successful build; by default it is removed.
set -euo pipefail

K8S_VERSION=${ZT_K8S_VERSION:-v1.37.2}
ETCD_VERSION=${ZT_ETCD_VERSION:-v3.6.16}
CACHE=${ZT_CACHE:-$HOME/.cache/zt}
OUT=$CACHE/k8s/$K8S_VERSION
BUILD=$CACHE/k8s-build

step() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

kube_ok() { [ -x "$OUT/kube-apiserver" ] && [ "$("$OUT/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $K8S_VERSION" ]; }
etcd_ok() { [ -x "$OUT/etcd" ] && "$OUT/etcd" --version 2>/dev/null | grep -qx "etcd Version: ${ETCD_VERSION#v}"; }

if kube_ok && etcd_ok; then
  step "kube-apiserver $K8S_VERSION and etcd $ETCD_VERSION cached in $OUT"
  echo "$OUT"
  exit 0
fi

# Go's tarball installs to /usr/local/go without touching PATH (sudo and cron drop it too).
command -v go >/dev/null 2>&1 || PATH=/usr/local/go/bin:$PATH
command -v go >/dev/null 2>&1 || die "go not found in PATH or /usr/local/go/bin (install Go >= 1.26 first)"
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
[ "$GOTOOLCHAIN" = local ] && export GOTOOLCHAIN=auto   # the machine's go.env says local
export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=0
export GOCACHE=$BUILD/gocache
mkdir -p "$OUT" "$BUILD"
GO=(nice -n 19 go)

# Writes a go.mod in $1 for module $2 requiring $3@$4, plus the replace lines on stdin.
new_module() {
  local dir=$1
  rm -rf "$dir" && mkdir -p "$dir"
  { printf 'module %s\n\ngo 1.26.0\n\nrequire %s %s\n\n' "$2" "$3" "$4"; cat; } >"$dir/go.mod"
}

if ! kube_ok; then
  step "building kube-apiserver $K8S_VERSION (cold: about 11 minutes on 2 busy CPUs; ~0.8 GiB module cache + ~3 GiB build cache)"
  gomod=$(cd "$BUILD" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
    | sed -n 's/.*"GoMod": "\([^"]*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not fetch the go.mod of k8s.io/kubernetes@$K8S_VERSION from the module proxy"
  # Staging modules = those kubernetes both requires and replaces with ./staging/...; pin each
  # to the published v0.Y.Z (sample-* modules are replaced but not required, and not published).
  staging_ver="v0.${K8S_VERSION#v1.}"
  required=$(sed -n '/^require (/,/^)/p' "$gomod" | awk '$2 == "v0.0.0" {print $1}')
  replaced=$(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")
  pins=$(comm -12 <(sort <<<"$required") <(sort <<<"$replaced"))
  [ -n "$pins" ] || die "found no staging modules in $gomod"
  dir=$BUILD/kubernetes-$K8S_VERSION
  { echo 'replace ('; for m in $pins; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_ver"; done; echo ')'; } \
    | new_module "$dir" zt.local/k8s-build k8s.io/kubernetes "$K8S_VERSION"
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$dir" && "${GO[@]}" get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" >&2 \
    && "${GO[@]}" build -ldflags="$ldflags" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver) \
    || die "kube-apiserver build failed (module proxy refusing a module? see above)"
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
  kube_ok || die "built kube-apiserver does not report $K8S_VERSION: $("$OUT/kube-apiserver" --version 2>&1)"
fi

if ! etcd_ok; then
  step "building etcd $ETCD_VERSION (cold: about 1-3 minutes)"
  dir=$BUILD/etcd-$ETCD_VERSION
  new_module "$dir" zt.local/etcd-build go.etcd.io/etcd/server/v3 "$ETCD_VERSION" </dev/null
  # etcd's version string is a constant in go.etcd.io/etcd/api/v3/version; server/v3 requires
  # the api, client and pkg modules of the same release, so no pins are needed here.
  (cd "$dir" && "${GO[@]}" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2 \
    && "${GO[@]}" build -ldflags="-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3) \
    || die "etcd build failed (module proxy refusing a module? see above)"
  mv "$OUT/etcd.tmp" "$OUT/etcd"
  etcd_ok || die "built etcd does not report $ETCD_VERSION: $("$OUT/etcd" --version 2>&1)"
fi

if [ "${ZT_KEEP_GOCACHE:-0}" != 1 ]; then
  step "removing the Go build cache $GOCACHE (set ZT_KEEP_GOCACHE=1 to keep it)"
  go clean -cache >/dev/null 2>&1 || true
  rm -rf "$GOCACHE"
fi
step "kube-apiserver $K8S_VERSION and etcd $ETCD_VERSION cached in $OUT"
echo "$OUT"
