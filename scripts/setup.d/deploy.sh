# Sourced by scripts/setup.sh: what the deployment tests (tests/tests/deploy)
# and `make oci` need. Installs only what is missing.

# umoci builds the OCI image and skopeo pushes it (no Docker daemon);
# docker-registry is the local registry the test pushes to and pulls from;
# prometheus brings promtool and the server the alert test starts. None is
# started as a service: each test starts its own on a loopback port.
apt_install umoci skopeo docker-registry prometheus jq

# kubectl renders the kustomize install (`kubectl kustomize`) in the
# deployment tests: kubectl 1.27 or later, whose kustomize (v5) has the
# components and replacements istio/ uses. It comes from the `kubectl` package
# of Kubernetes' apt repository (pkgs.k8s.io), whose source setup does not
# add; Debian's own `kubernetes-client` is kubectl 1.20, with kustomize v2.
deploy_kustomize=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
if [ -z "$deploy_kustomize" ] || [ "$deploy_kustomize" -lt 5 ]; then
  echo "setup: kubectl 1.27 or later (kustomize v5) is needed and $(command -v kubectl >/dev/null && echo "$(command -v kubectl) has kustomize v${deploy_kustomize:-?}" || echo "kubectl is missing"): install the package \`kubectl\` from Kubernetes' apt repository (https://pkgs.k8s.io), then run make again" >&2
  exit 1
fi
unset deploy_kustomize

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
