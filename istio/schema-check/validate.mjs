// Validates Kubernetes manifests against Istio's and the Prometheus
// Operator's published CRD schemas, as compiled by the npm packages
// @kubernetes-models/istio (from Istio's crd-all.gen.yaml) and
// @kubernetes-models/prometheus-operator (from the operator's CRDs).
//
//   node istio/schema-check/validate.mjs NODE_MODULES < manifests.json
//
// stdin: a JSON array of manifests. Prints one line per manifest, `ok KIND
// NAME` or `invalid KIND NAME: reason`; exits 1 if any is invalid or has no
// schema here. NODE_MODULES is where scripts/setup.d/deploy.sh installed the
// packages (.venv/schema-check/node_modules).
//
// Types, enums, patterns and required fields come from the compiled schema.
// Unknown fields do not fail a structural schema (the API server drops them,
// or refuses them under `kubectl apply`'s strict field validation), so they
// are found here: the manifest is handed to the validator behind a Proxy that
// records which properties the validator reads. A key the validator never
// read, in an object whose other keys it did read one by one, is a field the
// schema does not have. Objects it never looks into (free-form fields such as
// pluginConfig, or an EnvoyFilter patch's Envoy config) and maps it walks
// (labels) are left alone.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const SCHEMAS = {
  "extensions.istio.io/v1alpha1 WasmPlugin": "@kubernetes-models/istio/_schemas/ExtensionsIstioIoV1alpha1WasmPlugin.js",
  "networking.istio.io/v1 DestinationRule": "@kubernetes-models/istio/_schemas/NetworkingIstioIoV1DestinationRule.js",
  "networking.istio.io/v1alpha3 EnvoyFilter": "@kubernetes-models/istio/_schemas/NetworkingIstioIoV1alpha3EnvoyFilter.js",
  "networking.istio.io/v1 ServiceEntry": "@kubernetes-models/istio/_schemas/NetworkingIstioIoV1ServiceEntry.js",
  "monitoring.coreos.com/v1 PrometheusRule":
    "@kubernetes-models/prometheus-operator/_schemas/ComGithubPrometheusOperatorPrometheusOperatorPkgApisMonitoringV1PrometheusRule.js",
};

// Wraps every object and array under `value` in a recording Proxy.
function watch(value, path, nodes) {
  if (value === null || typeof value !== "object") return value;
  const node = { path, value, read: new Set(), walked: false };
  nodes.push(node);
  const children = Array.isArray(value) ? [] : {};
  for (const [key, child] of Object.entries(value)) {
    children[key] = watch(child, `${path}/${key}`, nodes);
  }
  return new Proxy(children, {
    get(target, key, receiver) {
      if (typeof key === "string") node.read.add(key);
      return Reflect.get(target, key, receiver);
    },
    has(target, key) {
      if (typeof key === "string") node.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      node.walked = true;
      return Reflect.ownKeys(target);
    },
  });
}

function unknownFields(nodes) {
  const unknown = [];
  for (const node of nodes) {
    if (Array.isArray(node.value) || node.walked || node.read.size === 0) continue;
    for (const key of Object.keys(node.value)) {
      if (!node.read.has(key)) unknown.push(`${node.path}/${key}`);
    }
  }
  return unknown;
}

const nodeModules = process.argv[2];
if (!nodeModules) {
  console.error("usage: node validate.mjs NODE_MODULES < manifests.json");
  process.exit(2);
}
const manifests = JSON.parse(readFileSync(0, "utf8"));
let failed = false;
for (const manifest of manifests) {
  const key = `${manifest.apiVersion} ${manifest.kind}`;
  const name = manifest.metadata?.name;
  const schema = SCHEMAS[key];
  if (!schema) {
    console.log(`invalid ${key} ${name}: no published schema known here for ${key}`);
    failed = true;
    continue;
  }
  const { validate } = await import(pathToFileURL(join(nodeModules, schema)).href);
  const nodes = [];
  const problems = [];
  if (!validate(watch(manifest, "", nodes))) {
    for (const e of validate.errors) problems.push(`${e.instancePath || "/"} ${e.message ?? e.keyword} ${JSON.stringify(e.params)}`);
  }
  for (const field of unknownFields(nodes)) problems.push(`${field}: unknown field`);
  if (problems.length) {
    console.log(`invalid ${manifest.kind} ${name}: ${problems.join("; ")}`);
    failed = true;
  } else {
    console.log(`ok ${manifest.kind} ${name}`);
  }
}
process.exit(failed ? 1 : 0);
