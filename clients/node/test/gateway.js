"use strict";
// Starts the real gateway binary on the embedded simulator for the tests.

const path = require("node:path");
const fs = require("node:fs");
const readline = require("node:readline");
const { spawn } = require("node:child_process");

// The longest the gateway may take to log its address, and to exit after SIGTERM.
const STARTUP_LIMIT_MS = 60_000;
// The longest the gateway may take to log a line the test waits for.
const LINE_LIMIT_MS = 30_000;
const STOP_LIMIT_MS = 30_000;
// How many of the gateway's last log lines a failure shows.
const KEPT_LINES = 200;

// Settles like `promise`, or rejects with `message()` if it has not settled within `limitMs`.
function within(promise, limitMs, message) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(message())), limitMs);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

// Starts the gateway in front of `upstream` (its flags; the simulator unless told) with
// `extraArgs`. Resolves with { address, linesLogged(test, count), stop() }.
async function startGateway(extraArgs = [], { upstream = ["--simulator"], retryDelay = "1500ms" } = {}) {
  const binary = process.env.TASKGATE_TEST_BINARY || path.resolve(__dirname, "..", "..", "..", "target", "debug", "taskgate");
  if (!fs.existsSync(binary)) {
    throw new Error(`no taskgate binary at ${binary}: run 'cargo build' or set TASKGATE_TEST_BINARY`);
  }
  const child = spawn(binary, ["serve", ...upstream, "--listen", "127.0.0.1:0", "--retry-delay", retryDelay, ...extraArgs], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: "info", TASKGATE_LOG_FORMAT: "text" },
  });
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve(code ?? signal)));
  // The 'line' listener stays for the process's lifetime, so stderr (the gateway's log) is read
  // to its end, not just up to the "listening" line: a pipe nobody reads fills up, and then the
  // gateway's log writer blocks and every later line is lost.
  const recent = [];
  const log = () => recent.join("\n");
  // Every line logged that a test may wait for, and the waits: they are checked on each line.
  const logged = [];
  const waits = new Set();
  const lines = readline.createInterface({ input: child.stderr });
  const listening = new Promise((resolve, reject) => {
    exited.then((code) => reject(new Error(`the gateway exited with ${code} before it listened:\n${log()}`)));
    lines.on("line", (line) => {
      recent.push(line);
      if (recent.length > KEPT_LINES) recent.shift();
      logged.push(line);
      for (const wait of waits) wait();
      const match = /gateway listening address=(\S+)/.exec(line);
      if (match) resolve(match[1]);
    });
  });
  let address;
  try {
    address = await within(
      listening,
      STARTUP_LIMIT_MS,
      () => `the gateway did not log its listening address within ${STARTUP_LIMIT_MS} ms:\n${log()}`,
    );
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
  return {
    address,
    // Resolves with the logged lines that pass `test` once there are `count` of them; rejects
    // if there are not within LINE_LIMIT_MS.
    linesLogged: (test, count) => {
      let check;
      const found = new Promise((resolve) => {
        check = () => {
          const matching = logged.filter(test);
          if (matching.length < count) return;
          waits.delete(check);
          resolve(matching);
        };
        waits.add(check);
        check();
      });
      return within(found, LINE_LIMIT_MS, () => `the gateway did not log ${count} such lines within ${LINE_LIMIT_MS} ms:\n${log()}`).finally(
        () => waits.delete(check),
      );
    },
    // Sends SIGTERM and resolves with the exit code (or the signal that ended the process).
    stop: async () => {
      child.kill("SIGTERM");
      try {
        return await within(
          exited,
          STOP_LIMIT_MS,
          () => `the gateway did not exit within ${STOP_LIMIT_MS} ms of SIGTERM:\n${log()}`,
        );
      } catch (error) {
        child.kill("SIGKILL");
        throw error;
      }
    },
  };
}

module.exports = { startGateway };
