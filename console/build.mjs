// Builds the console into dist/, which is committed and embedded in the gateway (build.rs):
// generates the proto's code with Debian's protoc and protoc-gen-es into gen/ (git ignores it),
// bundles src/console.js and src/console.css with esbuild under names that carry a hash of their
// content, and writes dist/index.html naming them. The same sources give the same bytes.
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

// The page names each file by its hashed name; the icon is copied under one too.
const names = {};
for (const [path, output] of Object.entries(built.metafile.outputs)) {
  const source = output.entryPoint.split("/").pop();
  names[source] = path.split("/").pop();
}
const icon = readFileSync(join(here, "src", "icon.svg"));
names["icon.svg"] = `icon-${createHash("sha256").update(icon).digest("hex").slice(0, 8).toUpperCase()}.svg`;
copyFileSync(join(here, "src", "icon.svg"), join(out, names["icon.svg"]));
const html = readFileSync(join(here, "src", "index.html"), "utf8").replace(/\{\{([\w.]+)\}\}/g, (_, source) => {
  if (!names[source]) throw new Error(`src/index.html names {{${source}}}, which the build does not make`);
  return names[source];
});
writeFileSync(join(out, "index.html"), html);

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
