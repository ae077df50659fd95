# Sourced by scripts/setup.sh: what the deployment tests (tests/tests/deploy)
# and `make oci` need. Installs only what is missing.

# umoci builds the OCI image and skopeo pushes it (no Docker daemon);
# docker-registry is the local registry the test pushes to and pulls from;
# prometheus brings promtool and the server the alert test starts. None is
# started as a service: each test starts its own on a loopback port.
apt_install umoci skopeo docker-registry prometheus jq

# Istio's and the Prometheus Operator's published CRD schemas, from npm, in a
# project-local directory; versions pinned by istio/schema-check/package-lock.json.
command -v npm >/dev/null || apt_install nodejs npm
deploy_schemas=.venv/schema-check
if ! cmp -s istio/schema-check/package-lock.json "$deploy_schemas/package-lock.json" \
  || [ ! -d "$deploy_schemas/node_modules/@kubernetes-models/istio" ]; then
  echo "setup: npm ci (Istio and Prometheus Operator CRD schemas) into $deploy_schemas/"
  rm -rf "$deploy_schemas"
  mkdir -p "$deploy_schemas"
  cp istio/schema-check/package.json istio/schema-check/package-lock.json "$deploy_schemas/"
  # The packages ask for Node 22; their validators run on the Node 18/20 of
  # Debian and the machine image, so the engine check is only a warning.
  (cd "$deploy_schemas" && npm ci --no-audit --no-fund --loglevel=error)
fi
unset deploy_schemas
