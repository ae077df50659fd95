# Deployment: the OCI image Istio's WasmPlugin pulls, and the Prometheus rules
# (istio/; README "Deploying on Istio"). Included by the root Makefile.

# The image's tag follows the filter crate's version.
OCI_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' filter/Cargo.toml | head -n 1)
OCI_LAYOUT ?= $(CARGO_TARGET_DIR)/oci/grpc-guard
# Where `make oci-push` copies the image, e.g. docker://registry.example.com/grpc-guard:0.1.0;
# OCI_PUSH_FLAGS passes skopeo options (--dest-creds, --dest-tls-verify=false, …).
OCI_DEST ?=
OCI_PUSH_FLAGS ?=

.PHONY: oci oci-push prometheusrule deploy-test

# An OCI image layout of the release .wasm (Istio's "compat" Wasm image:
# one tar+gzip layer holding plugin.wasm), built with umoci, no Docker daemon.
oci: wasm
	@digest=$$(istio/oci-image.sh $(WASM) $(OCI_LAYOUT) $(OCI_TAG)) && \
	  echo "oci: oci:$(OCI_LAYOUT):$(OCI_TAG) ($$digest)" && \
	  echo "push: make oci-push OCI_DEST=docker://REGISTRY/grpc-guard:$(OCI_TAG); then set image: oci://REGISTRY/grpc-guard@$$digest in your overlay's values.yaml"

oci-push: oci
	@test -n "$(OCI_DEST)" || { echo "set OCI_DEST, e.g. make oci-push OCI_DEST=docker://registry.example.com/grpc-guard:$(OCI_TAG)"; exit 2; }
	skopeo copy $(OCI_PUSH_FLAGS) oci:$(OCI_LAYOUT):$(OCI_TAG) $(OCI_DEST)

# istio/base/prometheusrule.yaml = its own header + the groups of
# istio/alerts.rules.yml and istio/seconds.rules.yml.
PROMETHEUS_RULE := istio/base/prometheusrule.yaml
prometheusrule:
	@{ sed '/^spec:$$/q' $(PROMETHEUS_RULE); sed -n '/^groups:/,$$p' istio/alerts.rules.yml | sed 's/^/  /'; \
	   sed -n '/^groups:/,$$p' istio/seconds.rules.yml | sed '1d; s/^/  /'; } \
	  > $(PROMETHEUS_RULE).new && mv $(PROMETHEUS_RULE).new $(PROMETHEUS_RULE)
	@echo "wrote $(PROMETHEUS_RULE)"

# The deployment tests alone: manifests, rules, OCI image through a local
# registry, alerts on a real Prometheus.
deploy-test: wasm
	$(CARGO) test -p grpc-guard-tests --test deploy
