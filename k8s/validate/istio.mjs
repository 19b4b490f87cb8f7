#!/usr/bin/env node
// Validates the Istio kinds of a rendered manifest stream (WasmPlugin,
// EnvoyFilter) against Istio's CRD schemas, as compiled into the pinned npm
// package @kubernetes-models/istio. The core kinds are kubernetes-validate's
// job; this covers what it only warns about. Usage:
//
//   kubectl kustomize k8s/global | node k8s/validate/istio.mjs
//   node k8s/validate/istio.mjs rendered.yaml
//   node k8s/validate/istio.mjs --plugin-config rendered.yaml
//       (also prints each WasmPlugin's pluginConfig as one line of JSON:
//        the text Istio hands the filter)
//
// Prints `ok <Kind>/<name>` per valid document. Exits 0 if all are valid,
// 1 on any invalid document (with the validator's message) or unreadable
// input, 2 if the input holds no WasmPlugin or EnvoyFilter at all.
// Note: the schemas check types, enums, patterns and required fields, but do
// not reject unknown fields (the API server does, with kubectl's default
// --validate=strict).

import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { WasmPlugin } from "@kubernetes-models/istio/extensions.istio.io/v1alpha1/WasmPlugin";
import { EnvoyFilter } from "@kubernetes-models/istio/networking.istio.io/v1alpha3/EnvoyFilter";

// The kinds checked, by API group, and the validator for each API version
// the package has. A checked kind in a version not listed here is an error,
// never silently skipped.
const MODELS = {
  "extensions.istio.io": { kind: "WasmPlugin", versions: { v1alpha1: WasmPlugin } },
  "networking.istio.io": { kind: "EnvoyFilter", versions: { v1alpha3: EnvoyFilter } },
};

function usage(message) {
  process.stderr.write(`istio.mjs: ${message}\nusage: node istio.mjs [--plugin-config] [FILE|-]\n`);
  process.exit(1);
}

const args = process.argv.slice(2);
const printPluginConfig = args[0] === "--plugin-config";
if (printPluginConfig) args.shift();
if (args.length > 1 || (args[0] ?? "").startsWith("--")) usage("bad arguments");
const source = args[0] ?? "-";

let text;
try {
  text = readFileSync(source === "-" ? 0 : source, "utf8");
} catch (error) {
  usage(`cannot read ${source === "-" ? "standard input" : source}: ${error.message}`);
}

// Read YAML as Kubernetes does (sigs.k8s.io/yaml, go-yaml v2): YAML 1.1, so
// `on`/`yes` are booleans and `010` is octal, but without 1.1's base-60
// numbers (`1:30`), which go-yaml never had.
const documents = parseAllDocuments(text, {
  version: "1.1",
  customTags: (tags) => tags.filter((tag) => tag.format !== "TIME"),
  prettyErrors: true,
});

let checked = 0;
let failed = 0;
documents.forEach((document, index) => {
  const where = `document ${index + 1}`;
  if (document.errors.length > 0) {
    failed++;
    console.log(`FAIL ${where}: not valid YAML`);
    for (const error of document.errors) console.log(`  ${error.message}`);
    return;
  }
  const object = document.toJS();
  if (object === null || typeof object !== "object" || Array.isArray(object)) return;
  const [group, version] = String(object.apiVersion ?? "").split("/");
  const entry = MODELS[group];
  if (!entry || object.kind !== entry.kind) return;

  checked++;
  const label = `${object.kind}/${object.metadata?.name ?? `(${where}, no name)`}`;
  const Model = entry.versions[version];
  if (!Model) {
    failed++;
    const known = Object.keys(entry.versions).map((v) => `${group}/${v}`).join(", ");
    console.log(`FAIL ${label}: no schema for apiVersion ${object.apiVersion} (known: ${known})`);
    return;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    failed++;
    console.log(`FAIL ${label}: ${error.message}`);
    for (const detail of error.errors ?? []) {
      if (detail.params && Object.keys(detail.params).length > 0) {
        console.log(`  at ${detail.instancePath || "/"}: ${detail.keyword} ${JSON.stringify(detail.params)}`);
      }
    }
    return;
  }
  console.log(`ok ${label}`);
  if (printPluginConfig && object.kind === "WasmPlugin") {
    console.log(`pluginConfig ${label} ${JSON.stringify(object.spec?.pluginConfig ?? null)}`);
  }
});

if (failed > 0) {
  console.log(`${failed} document(s) failed`);
  process.exit(1);
}
if (checked === 0) {
  process.stderr.write("istio.mjs: nothing to validate: no WasmPlugin or EnvoyFilter in the input\n");
  process.exit(2);
}
