// Builds the console into dist/, which is committed and embedded in the gateway (build.rs):
// generates the proto's code with Debian's protoc and protoc-gen-es into gen/ (git ignores it),
// bundles src/console.js and src/console.css with esbuild under names that carry a hash of their
// content, writes the licenses of the npm packages the bundle holds into one hashed text file
// (their packages carry no license file to copy: the texts are kept in licenses/), and writes
// dist/index.html naming them all. The same sources give the same bytes.
//
// `node build.mjs --check` builds into a temporary folder instead and fails, naming the files,
// if the result differs from the committed dist/.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes("--check");
const dist = join(here, "dist");
const out = check ? mkdtempSync(join(tmpdir(), "taskgate-console-")) : dist;

// The bundle embeds the descriptor protoc hands the generator, so another protoc can give other
// bytes: dist/ is built with Debian 12's.
const PROTOC = "libprotoc 3.21.12";
const protoc = execFileSync("protoc", ["--version"], { encoding: "utf8" }).trim();
if (protoc !== PROTOC) {
  console.error(`console/build.mjs: protoc is '${protoc}', not '${PROTOC}' (Debian 12's protobuf-compiler), which console/dist is built with: another can give other bytes`);
  process.exit(1);
}

const gen = join(here, "gen");
rmSync(gen, { recursive: true, force: true });
mkdirSync(gen);
execFileSync("protoc", [
  "-I", join(here, "..", "proto"),
  "-I", join(here, "proto"),
  "-I", "/usr/include",
  `--plugin=protoc-gen-es=${join(here, "node_modules", ".bin", "protoc-gen-es")}`,
  `--es_out=${gen}`,
  "--es_opt=target=js",
  "taskgate/v1/task.proto",
  "google/rpc/error_details.proto",
], { stdio: "inherit" });

rmSync(out, { recursive: true, force: true });
mkdirSync(out);
const built = await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/console.js", "src/console.css"],
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "eof",
  charset: "utf8",
  entryNames: "[name]-[hash]",
  outdir: out,
  metafile: true,
  logLevel: "warning",
});

// The page names each file by its hashed name; the icon and the licenses are written under one too.
const names = {};
for (const [path, output] of Object.entries(built.metafile.outputs)) {
  const source = output.entryPoint.split("/").pop();
  names[source] = path.split("/").pop();
}
const hashed = (name, content) => {
  const [stem, extension] = name.split(".");
  return `${stem}-${createHash("sha256").update(content).digest("hex").slice(0, 8).toUpperCase()}.${extension}`;
};
const icon = readFileSync(join(here, "src", "icon.svg"));
names["icon.svg"] = hashed("icon.svg", icon);
copyFileSync(join(here, "src", "icon.svg"), join(out, names["icon.svg"]));
const licenses = licensesOf(Object.keys(built.metafile.inputs));
names["licenses.txt"] = hashed("licenses.txt", licenses);
writeFileSync(join(out, names["licenses.txt"]), licenses);
const html = readFileSync(join(here, "src", "index.html"), "utf8").replace(/\{\{([\w.]+)\}\}/g, (_, source) => {
  if (!names[source]) throw new Error(`src/index.html names {{${source}}}, which the build does not make`);
  return names[source];
});
writeFileSync(join(out, "index.html"), html);

// The license text of each SPDX identifier a bundled package's license names.
function licenseText(identifier) {
  const file = { "Apache-2.0": "Apache-2.0.txt", "BSD-3-Clause": "BSD-3-Clause.txt" }[identifier];
  if (!file) throw new Error(`a bundled package is under ${identifier}, and console/licenses has no text for it: add one`);
  return readFileSync(join(here, "licenses", file), "utf8");
}

// Every npm package the bundle holds code of (from esbuild's inputs), with its version and its
// license as its package.json states them, then the text of each license named.
function licensesOf(inputs) {
  const packages = [...new Set(inputs.flatMap((input) => /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(input)?.[1] ?? []))].sort();
  const identifiers = new Set();
  const lines = [
    "The operator console's script bundles these npm packages, under these licenses:",
    "",
  ];
  for (const name of packages) {
    const { version, license } = JSON.parse(readFileSync(join(here, "node_modules", name, "package.json"), "utf8"));
    lines.push(`${name} ${version}: ${license}`);
    for (const identifier of license.match(/[A-Za-z0-9.-]+/g).filter((word) => !["AND", "OR", "WITH"].includes(word))) {
      identifiers.add(identifier);
    }
  }
  const texts = [...identifiers].sort().map((identifier) => `=== ${identifier} ===\n\n${licenseText(identifier).replace(/^\n+/, "").trimEnd()}\n`);
  return `${lines.join("\n")}\n\n${texts.join("\n")}`;
}

if (check) {
  const listing = (folder) => readdirSync(folder).sort();
  const committed = listing(dist);
  const rebuilt = listing(out);
  const differing = [...new Set([...committed, ...rebuilt])].filter((name) =>
    !committed.includes(name) || !rebuilt.includes(name) ||
    !readFileSync(join(dist, name)).equals(readFileSync(join(out, name))));
  rmSync(out, { recursive: true, force: true });
  if (differing.length > 0) {
    console.error(`console/dist differs from a fresh build of console/src: ${differing.join(", ")}; run 'node console/build.mjs' and commit console/dist`);
    process.exit(1);
  }
  console.log("console/dist is the build of console/src");
}
