#!/usr/bin/env node
// Offline validation of Kubernetes / Istio manifests, without a cluster:
//
//   node validate.mjs <file.yaml|dir>...
//
// 1. Schema: every document is validated against its kind's OpenAPI schema, as the API
//    server would: Istio kinds with @kubernetes-models/istio (schemas generated from Istio
//    1.29's CRDs), core kinds with kubernetes-models. A kind neither package knows is an error.
// 2. Unknown fields: CRD schemas do not reject unknown fields (the API server silently
//    prunes them, so a typo such as `failStrategyy` is lost without a word). Each field is
//    probed instead: its value is replaced by one no schema type accepts (a non-integer
//    number, then a nested array); a field the schema declares then fails validation, a
//    field it does not know still passes and is reported. Free-form subtrees the schema
//    leaves open on purpose (FREE_FORM below) are not probed inside.
//
// Prints `ok <file> <Kind>/<name>` per document, or `error <file> <Kind>/<name>: <what>`;
// exits 1 when anything failed.
import fs from "node:fs";
import path from "node:path";
import yaml from "js-yaml";

// Paths (JSON pointer patterns, `*` = any key or index) whose contents are free-form by
// design: the plugin's own configuration and EnvoyFilter patch values (Envoy protos that
// the CRD does not describe; Envoy itself validates those).
const FREE_FORM = [
  "/spec/pluginConfig",
  "/spec/configPatches/*/patch/value",
];

function modulePath(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  if (group.endsWith("istio.io")) return `@kubernetes-models/istio/${group}/${version}/${kind}`;
  if (group === "") return `kubernetes-models/${version}/${kind}`;
  return `kubernetes-models/${group}/${version}/${kind}`;
}

async function modelFor(apiVersion, kind) {
  const spec = modulePath(apiVersion, kind);
  try {
    const mod = await import(spec);
    if (typeof mod[kind] !== "function") throw new Error(`${spec} exports no ${kind}`);
    return mod[kind];
  } catch (e) {
    throw new Error(`no schema for ${apiVersion} ${kind} (${spec}): ${e.message.split("\n")[0]}`);
  }
}

function schemaErrors(Model, doc) {
  try {
    new Model(doc).validate();
    return [];
  } catch (e) {
    if (Array.isArray(e.errors)) return e.errors.map((x) => `${x.instancePath || "/"} ${x.message}`);
    return [e.message];
  }
}

function isFreeForm(pointer) {
  const parts = pointer.split("/");
  return FREE_FORM.some((pattern) => {
    const pp = pattern.split("/");
    return pp.length === parts.length && pp.every((p, i) => p === "*" || p === parts[i]);
  });
}

const PROBES = [12345.5, [[]]];

// Returns the JSON pointers of fields the schema does not declare. `doc` is a copy: it is
// modified while probing and restored field by field.
function unknownFields(Model, doc) {
  const found = [];
  const walk = (node, pointer) => {
    if (Array.isArray(node)) {
      node.forEach((item, i) => walk(item, `${pointer}/${i}`));
      return;
    }
    if (node === null || typeof node !== "object") return;
    for (const key of Object.keys(node)) {
      // apiVersion and kind select the model; probing them says nothing.
      if (pointer === "" && (key === "apiVersion" || key === "kind")) continue;
      const child = `${pointer}/${key.replaceAll("~", "~0").replaceAll("/", "~1")}`;
      const saved = node[key];
      let declared = false;
      for (const probe of PROBES) {
        node[key] = probe;
        if (schemaErrors(Model, doc).length > 0) {
          declared = true;
          break;
        }
      }
      node[key] = saved;
      if (!declared) found.push(child);
      else if (!isFreeForm(child)) walk(saved, child);
    }
  };
  walk(doc, "");
  return found;
}

function files(args) {
  const out = [];
  for (const a of args) {
    const st = fs.statSync(a);
    if (st.isDirectory()) {
      for (const f of fs.readdirSync(a).sort()) {
        const p = path.join(a, f);
        if (fs.statSync(p).isDirectory()) out.push(...files([p]));
        else if (/\.ya?ml$/.test(f)) out.push(p);
      }
    } else {
      out.push(a);
    }
  }
  return out;
}

async function main(args) {
  if (args.length === 0) {
    console.error("usage: node validate.mjs <file.yaml|dir>...");
    return 2;
  }
  let failed = 0;
  let checked = 0;
  for (const file of files(args)) {
    let docs;
    try {
      docs = yaml.loadAll(fs.readFileSync(file, "utf8")).filter((d) => d !== null && d !== undefined);
    } catch (e) {
      console.log(`error ${file}: YAML: ${e.message.split("\n")[0]}`);
      failed++;
      continue;
    }
    for (const doc of docs) {
      const label = `${doc?.kind ?? "?"}/${doc?.metadata?.name ?? "?"}`;
      const problems = [];
      if (typeof doc !== "object" || !doc.apiVersion || !doc.kind) {
        problems.push("not a Kubernetes object (apiVersion and kind are required)");
      } else {
        try {
          const Model = await modelFor(doc.apiVersion, doc.kind);
          const errs = schemaErrors(Model, doc);
          problems.push(...errs.map((e) => `schema: ${e}`));
          if (errs.length === 0) {
            const copy = structuredClone(doc);
            problems.push(...unknownFields(Model, copy).map((p) => `unknown field ${p}`));
          }
        } catch (e) {
          problems.push(e.message);
        }
      }
      checked++;
      if (problems.length) {
        failed++;
        for (const p of problems) console.log(`error ${file} ${label}: ${p}`);
      } else {
        console.log(`ok ${file} ${label}`);
      }
    }
  }
  console.log(`${checked} documents checked, ${failed} with errors`);
  return failed ? 1 : 0;
}

process.exitCode = await main(process.argv.slice(2));
