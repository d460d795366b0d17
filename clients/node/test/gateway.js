"use strict";
// Starts the real gateway binary on the embedded simulator for the tests.

const path = require("node:path");
const fs = require("node:fs");
const readline = require("node:readline");
const { spawn } = require("node:child_process");

async function startGateway(extraArgs = []) {
  const binary = process.env.TASKGATE_BIN || path.resolve(__dirname, "..", "..", "..", "target", "debug", "taskgate");
  if (!fs.existsSync(binary)) {
    throw new Error(`no taskgate binary at ${binary}: run 'cargo build' or set TASKGATE_BIN`);
  }
  const child = spawn(binary, ["serve", "--simulator", "--listen", "127.0.0.1:0", "--retry-delay", "1500ms", ...extraArgs], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: "info", TASKGATE_LOG_FORMAT: "text" },
  });
  const lines = readline.createInterface({ input: child.stderr });
  const address = await new Promise((resolve, reject) => {
    child.once("exit", (code) => reject(new Error(`the gateway exited with ${code} before it listened`)));
    lines.on("line", (line) => {
      const match = /gateway listening address=(\S+)/.exec(line);
      if (match) resolve(match[1]);
    });
  });
  return {
    address,
    stop: () =>
      new Promise((resolve) => {
        child.once("exit", (code) => resolve(code));
        child.kill("SIGTERM");
      }),
  };
}

module.exports = { startGateway };
