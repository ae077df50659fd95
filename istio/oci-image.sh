#!/usr/bin/env bash
# Packs grpc_guard.wasm into an OCI image layout that Istio's WasmPlugin pulls,
# without a Docker daemon: umoci (Debian) writes the layout; `make oci-push`
# or any registry client (skopeo copy oci:DIR:TAG docker://…) ships it.
#
#   istio/oci-image.sh WASM LAYOUT_DIR TAG      prints the manifest digest
#
# The image is Solo's "compat" Wasm image variant, the first one Istio's
# fetcher tries (pkg/wasm/imagefetcher.go): an OCI image manifest with one
# `application/vnd.oci.image.layer.v1.tar+gzip` layer whose tar holds the
# module as `plugin.wasm`, and a standard `application/vnd.oci.image.config.v1+json`
# config. Every registry and registry client handles it.
#
# Reproducible: fixed timestamps, mode and owner, so the same .wasm gives the
# same digest. (`umoci insert` would be shorter, but umoci 0.4.7 writes its
# layer without the tar padding and end blocks; unpack + repack writes a
# complete tar.)
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 WASM LAYOUT_DIR TAG" >&2
  exit 2
fi
wasm=$1 layout=$2 tag=$3
[ -f "$wasm" ] || { echo "oci-image: $wasm is missing: run \`make wasm\` first" >&2; exit 1; }
command -v umoci >/dev/null || { echo "oci-image: umoci is missing: run \`make setup\` (scripts/setup.sh)" >&2; exit 1; }

epoch=1970-01-01T00:00:00Z
bundle=$(mktemp -d)
trap 'rm -rf "$bundle"' EXIT

rm -rf "$layout"
mkdir -p "$(dirname "$layout")"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --rootless --image "$layout:$tag" "$bundle/b" >/dev/null
install -m 0644 "$wasm" "$bundle/b/rootfs/plugin.wasm"
touch -h -d "$epoch" "$bundle/b/rootfs/plugin.wasm" "$bundle/b/rootfs"
umoci repack --image "$layout:$tag" --history.created "$epoch" --history.author grpc-guard \
  --history.created_by "istio/oci-image.sh" --history.comment "plugin.wasm" "$bundle/b"
# GOOS/GOARCH names for a WASI module; Istio reads no platform. Set after
# the repack: umoci unpacks only linux images.
umoci config --image "$layout:$tag" --no-history --created "$epoch" --os wasip1 --architecture wasm \
  --author grpc-guard \
  --config.label org.opencontainers.image.title=grpc-guard \
  --config.label org.opencontainers.image.description="grpc-guard proxy-wasm filter (Istio WasmPlugin, compat variant)"
umoci gc --layout "$layout"
jq -r --arg tag "$tag" \
  '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $tag) | .digest' "$layout/index.json"
