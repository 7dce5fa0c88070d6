#!/usr/bin/env bash
# Builds a real SPIRE server and agent from Go modules (the only source reachable here) and
# caches them in ${ZT_CACHE:-$HOME/.cache/zt}/spire/<version>/ (~220 MB); prints that directory.
# Idempotent: when both cached binaries report the pinned version it builds nothing.
#
#   dir=$(scripts/spire.sh) && "$dir/spire-server" run -config ... && "$dir/spire-agent" run ...
#
# Why a local module: `go install github.com/spiffe/spire/cmd/spire-server@vX` can be refused
# because the proxy lists no versions for it. A small module that tracks both commands as
# tools (`go get -tool`) pins the release and everything it requires, then `go build` builds
# them. go-sqlite3 (the server's default datastore) needs cgo, hence CGO_ENABLED=1 and gcc.
# The version string is set the way SPIRE's Makefile sets it for a release (tag without "v").
#
# Environment: ZT_CACHE, ZT_SPIRE_VERSION, GOTOOLCHAIN (default here: auto, so a go.mod asking
# for a newer Go fetches it from the module proxy), ZT_KEEP_GOCACHE=1 keeps the Go build cache
# (about 2.3 GiB) after a successful build; by default it is removed.
set -euo pipefail

SPIRE_VERSION=${ZT_SPIRE_VERSION:-v1.13.3}
CACHE=${ZT_CACHE:-$HOME/.cache/zt}
OUT=$CACHE/spire/$SPIRE_VERSION
BUILD=$CACHE/spire-build
MOD=github.com/spiffe/spire

step() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

# Both print their version on stderr (mitchellh/cli), e.g. "1.13.3".
bin_ok() { [ -x "$OUT/$1" ] && [ "$("$OUT/$1" --version 2>&1)" = "${SPIRE_VERSION#v}" ]; }

if bin_ok spire-server && bin_ok spire-agent; then
  step "spire-server and spire-agent $SPIRE_VERSION cached in $OUT"
  echo "$OUT"
  exit 0
fi

command -v go >/dev/null 2>&1 || die "go not found (install Go >= 1.26 first)"
command -v gcc >/dev/null 2>&1 || die "gcc not found (go-sqlite3 needs cgo)"
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
[ "$GOTOOLCHAIN" = local ] && export GOTOOLCHAIN=auto   # the machine's go.env says local
export GOFLAGS="-trimpath -buildvcs=false"
export CGO_ENABLED=1
export GOCACHE=$BUILD/gocache
mkdir -p "$OUT" "$BUILD"
GO=(nice -n 19 go)

step "building spire-server and spire-agent $SPIRE_VERSION (cold: about 11 minutes on 2 busy CPUs; ~1.4 GiB module cache + ~2.3 GiB build cache)"
dir=$BUILD/spire-$SPIRE_VERSION
rm -rf "$dir" && mkdir -p "$dir"
printf 'module zt.local/spire-build\n\ngo 1.26.0\n' >"$dir/go.mod"
ldflags="-s -w -X $MOD/pkg/common/version.gittag=${SPIRE_VERSION#v}"
(cd "$dir" && "${GO[@]}" get -tool "$MOD/cmd/spire-server@$SPIRE_VERSION" "$MOD/cmd/spire-agent@$SPIRE_VERSION" >&2) \
  || die "go get $MOD@$SPIRE_VERSION failed (module proxy refusing a module? see above)"
for cmd in spire-server spire-agent; do
  bin_ok "$cmd" && continue
  (cd "$dir" && "${GO[@]}" build -ldflags="$ldflags" -o "$OUT/$cmd.tmp" "$MOD/cmd/$cmd") \
    || die "$cmd build failed (see above)"
  mv "$OUT/$cmd.tmp" "$OUT/$cmd"
  bin_ok "$cmd" || die "built $cmd does not report ${SPIRE_VERSION#v}: $("$OUT/$cmd" --version 2>&1)"
done

if [ "${ZT_KEEP_GOCACHE:-0}" != 1 ]; then
  step "removing the Go build cache $GOCACHE (set ZT_KEEP_GOCACHE=1 to keep it)"
  go clean -cache >/dev/null 2>&1 || true
  rm -rf "$GOCACHE"
fi
step "spire-server and spire-agent $SPIRE_VERSION cached in $OUT"
echo "$OUT"
