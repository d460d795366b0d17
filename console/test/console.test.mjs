// The console in a real browser: Debian's Chromium, headless, driven by puppeteer-core, against
// the real gateway binary (TASKGATE_TEST_BINARY) and the real simulator. The simulator runs as
// its own process, and its Log Publisher is reached through a proxy here, so that a test can
// take the Log Publisher away from the gateway and give it back. Every wait is bounded; every
// address is an ephemeral port on 127.0.0.1.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer } from "node:http";
import { randomUUID } from "node:crypto";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import * as esbuild from "esbuild";
import puppeteer from "puppeteer-core";
import { TaskService } from "../gen/taskgate/v1/task_pb.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const binary = process.env.TASKGATE_TEST_BINARY || join(root, "target", "debug", "taskgate");
const chromium = process.env.TASKGATE_TEST_CHROMIUM || "/usr/bin/chromium";
// The screenshot the README shows (docs/console.png is copied from it by hand).
const screenshot = process.env.TASKGATE_CONSOLE_SCREENSHOT || join(root, "target", "console.png");

// The longest a process may take to log its address, and to exit after SIGTERM.
const STARTUP_LIMIT_MS = 60_000;
// The longest the page may take to show what a test waits for. The simulator's steps take 2 s
// each; this is far more than any of them.
const SHOW_LIMIT_MS = 20_000;
// The gateway's RetryInfo delay: short, so that the page's own resuming is quick to see, and
// not the page's own first backoff (0.5 s), so that a test can tell which one it waited.
const RETRY_DELAY = "700ms";
const KEPT_LINES = 200;
// The longest a suite may take, whatever hangs: its processes, the browser or the page.
const SUITE_LIMIT_MS = 180_000;
const bounded = { timeout: SUITE_LIMIT_MS };

// === processes ===

function within(promise, limitMs, message) {
  let timer;
  const expired = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(message())), limitMs);
  });
  return Promise.race([promise, expired]).finally(() => clearTimeout(timer));
}

// Resolves once `count()` is above `floor`, looked at every 50 ms for at most SHOW_LIMIT_MS;
// fails with `message()` otherwise.
async function grows(count, floor, message) {
  const givingUpAt = Date.now() + SHOW_LIMIT_MS;
  while (count() <= floor && Date.now() < givingUpAt) await new Promise((resolveWait) => setTimeout(resolveWait, 50));
  assert.ok(count() > floor, message());
}

// Starts `binary args` and resolves once its log has matched every pattern, with each first
// capture, and a stop() that sends SIGTERM and waits (bounded) for the exit.
async function startProcess(args, patterns) {
  if (!existsSync(binary)) throw new Error(`no taskgate binary at ${binary}: run 'cargo build' or set TASKGATE_TEST_BINARY`);
  const child = spawn(binary, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: "info", TASKGATE_LOG_FORMAT: "text" },
  });
  const exited = new Promise((resolveExit) => child.once("exit", (code, signal) => resolveExit(code ?? signal)));
  const recent = [];
  const found = patterns.map(() => null);
  const ready = new Promise((resolveReady, reject) => {
    exited.then((code) => reject(new Error(`taskgate ${args[0]} exited with ${code}:\n${recent.join("\n")}`)));
    // Read to the end, so the log pipe never fills and blocks the process.
    createInterface({ input: child.stderr }).on("line", (line) => {
      recent.push(line);
      if (recent.length > KEPT_LINES) recent.shift();
      patterns.forEach((pattern, index) => {
        const match = found[index] === null && pattern.exec(line);
        if (match) found[index] = match[1];
      });
      if (found.every((value) => value !== null)) resolveReady(found);
    });
  });
  try {
    await within(ready, STARTUP_LIMIT_MS, () => `taskgate ${args[0]} did not log its addresses:\n${recent.join("\n")}`);
  } catch (error) {
    child.kill("SIGKILL");
    throw error;
  }
  return {
    found,
    stop: async () => {
      child.kill("SIGTERM");
      await within(exited, STARTUP_LIMIT_MS, () => `taskgate ${args[0]} did not exit after SIGTERM`).catch((error) => {
        child.kill("SIGKILL");
        throw error;
      });
    },
  };
}

// A TCP proxy to `target` that can be cut: cut() closes every connection and refuses new ones
// (accepted and closed at once, as a controller that is down would), restore() lets them through.
// hold() keeps back what `target` sends; release() sends all of it at once, as one write.
// retarget(other) sends new connections to `other`.
async function startProxy(target) {
  let [host, port] = target.split(":");
  const sockets = new Set();
  let up = true;
  let holding = false;
  let held = [];
  let heldChanged = () => {};
  const server = createServer((client) => {
    if (!up) {
      client.destroy();
      return;
    }
    const upstream = connect(Number(port), host);
    client.pipe(upstream);
    upstream.on("data", (chunk) => {
      if (!holding) {
        client.write(chunk);
        return;
      }
      held.push({ client, chunk });
      heldChanged();
    });
    for (const [from, to] of [[client, upstream], [upstream, client]]) {
      sockets.add(from);
      from.on("error", () => to.destroy());
      from.on("close", () => { sockets.delete(from); to.destroy(); });
    }
  });
  await new Promise((resolveListen) => server.listen(0, "127.0.0.1", resolveListen));
  const heldText = () => Buffer.concat(held.map(({ chunk }) => chunk)).toString("latin1");
  return {
    address: `127.0.0.1:${server.address().port}`,
    cut: () => {
      up = false;
      for (const socket of sockets) socket.destroy();
    },
    restore: () => { up = true; },
    retarget: (other) => { [host, port] = other.split(":"); },
    hold: () => { holding = true; },
    // Resolves once at least `count` lines matching `pattern` are held back.
    heldLines: (pattern, count) => within(new Promise((resolveHeld) => {
      heldChanged = () => {
        if (heldText().split("\r\n").filter((line) => pattern.test(line)).length >= count) resolveHeld();
      };
      heldChanged();
    }), SHOW_LIMIT_MS, () => `fewer than ${count} lines matching ${pattern} came: ${JSON.stringify(heldText())}`),
    release: () => {
      holding = false;
      for (const client of new Set(held.map((entry) => entry.client))) {
        client.write(Buffer.concat(held.filter((entry) => entry.client === client).map(({ chunk }) => chunk)));
      }
      held = [];
    },
    close: () => new Promise((resolveClose) => {
      for (const socket of sockets) socket.destroy();
      server.close(resolveClose);
    }),
  };
}

const LISTENING = /gateway listening address=(\S+)/;

// === the browser ===

let browser;

before(async () => {
  if (!existsSync(chromium)) throw new Error(`no Chromium at ${chromium}: install Debian's 'chromium' (scripts/console does) or set TASKGATE_TEST_CHROMIUM`);
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    // Root in a container has no user namespace for Chromium's sandbox.
    args: ["--no-sandbox", "--disable-gpu"],
    protocolTimeout: STARTUP_LIMIT_MS,
  });
});

after(async () => {
  await browser?.close();
});

const WATCH = "/taskgate.v1.TaskService/WatchCaseEvents";
const GET_STATE = "/taskgate.v1.TaskService/CaseGetState";
const CONFIG = "/console/config.json";

// Opens the console at `address` in a tablet-sized tab, collecting what the page reports as
// errors (console errors, uncaught exceptions and failed requests) and, in the order the
// browser saw them, when each watch and state read was sent and when each watch's response
// headers came, with the deadline (grpc-timeout) of every call but the watch, and the idempotency
// key each extract and cancel carried. `beforeLoad(tab)` runs before the page is loaded.
async function openConsole(address, beforeLoad = async () => {}) {
  const tab = await browser.newPage();
  await tab.setViewport({ width: 1024, height: 900 });
  tab.setDefaultTimeout(SHOW_LIMIT_MS);
  // From Chromium's own network events, which carry the time each happened: puppeteer's
  // request and response events may come in another order than their requests did.
  const network = await tab.createCDPSession();
  await network.send("Network.enable");
  const timed = [];
  const reads = { inFlight: 0, most: 0 };
  const readIds = new Set();
  const deadlines = new Set();
  network.on("Network.requestWillBeSent", ({ requestId, request, timestamp }) => {
    const path = new URL(request.url).pathname;
    if (path === WATCH) timed.push({ timestamp, call: "watch sent" });
    if (path === CONFIG) timed.push({ timestamp, call: "settings read sent" });
    if (path.startsWith("/taskgate.v1.TaskService/") && path !== WATCH) {
      const name = Object.keys(request.headers).find((header) => header.toLowerCase() === "grpc-timeout");
      deadlines.add(request.headers[name]);
    }
    if (path !== GET_STATE) return;
    timed.push({ timestamp, call: "state read sent" });
    readIds.add(requestId);
    reads.inFlight += 1;
    reads.most = Math.max(reads.most, reads.inFlight);
  });
  network.on("Network.responseReceived", ({ timestamp, response }) => {
    // A refusal is headers with a status (trailers-only): the watch never opened.
    if (new URL(response.url).pathname !== WATCH) return;
    const refused = Object.keys(response.headers).some((name) => name.toLowerCase() === "grpc-status");
    timed.push({ timestamp, call: refused ? "watch refused" : "watch opened" });
  });
  // A read is counted from when it is sent until its answer's headers come (or it fails): the page
  // sends the next only once it has the whole answer, after them, and a page that sent every
  // read at once would send them all before any answer came.
  for (const answered of ["Network.responseReceived", "Network.loadingFailed"]) {
    network.on(answered, ({ requestId }) => {
      if (readIds.delete(requestId)) reads.inFlight -= 1;
    });
  }
  const calls = {
    list: () => [...timed].sort((one, other) => one.timestamp - other.timestamp).map(({ call }) => call),
    deadlines,
    // The request_id of each extract and cancel the page handed the browser, in order.
    keys: () => tab.evaluate(() => window.sentKeys),
  };
  const errors = [];
  tab.on("console", (message) => { if (message.type() === "error") errors.push(`console: ${message.text()}`); });
  tab.on("pageerror", (error) => errors.push(`uncaught: ${error.message}`));
  tab.on("requestfailed", (request) => {
    // A watch the page itself ends (to watch again with a new token) is not an error.
    if (request.failure()?.errorText !== "net::ERR_ABORTED") errors.push(`request failed: ${request.url()} ${request.failure()?.errorText}`);
  });
  tab.on("response", (response) => { if (response.status() >= 400) errors.push(`HTTP ${response.status()}: ${response.url()}`); });
  // A gateway on a plant network is often plain http, not a secure context: browsers then
  // offer no crypto.randomUUID. Loopback is one, so the page is shown it as the other would be.
  await tab.evaluateOnNewDocument(() => { delete Crypto.prototype.randomUUID; });
  await tab.evaluateOnNewDocument(() => {
    window.sentKeys = [];
    const send = window.fetch;
    window.fetch = function (input, init) {
      const url = typeof input === "string" ? input : input.url;
      if (/\/Case(Extract|Cancel)$/.test(url)) {
        // The request_id is the one UUID in the call's protobuf body.
        const body = new TextDecoder("latin1").decode(init.body);
        window.sentKeys.push(/[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}/.exec(body)?.[0] ?? null);
      }
      return send.apply(this, arguments);
    };
  });
  await beforeLoad(tab);
  await tab.goto(`http://${address}/`, { waitUntil: "load" });
  return { tab, errors, calls, reads };
}

// The README's watch-then-state pattern: a state read sent before the watch is open could miss
// an event that changes the state between the two. So every state read follows the headers of
// the watch sent last.
function assertStateReadsFollowAnOpenWatch(calls) {
  const list = calls.list();
  assert.ok(list.includes("state read sent"), `no state read: ${list.join(", ")}`);
  let watch = "none sent";
  list.forEach((call, index) => {
    if (call === "watch sent") watch = "sent";
    if (call === "watch opened") watch = "open";
    if (call === "watch refused") watch = "refused";
    assert.ok(call !== "state read sent" || watch === "open",
      `call ${index + 1} is a state read while the watch is ${watch}: ${list.join(", ")}`);
  });
}

// The gateway's licenses file, as the page's footer links it.
async function fetchLicenses(tab, address) {
  const path = await tab.$eval("footer a", (link) => link.getAttribute("href"));
  assert.match(path, /^\/console\/licenses-[0-9A-Z]{8}\.txt$/);
  return fetch(`http://${address}${path}`);
}

const tileState = (tab, port) => tab.$eval(`li[data-port="${port}"]`, (tile) => tile.dataset.state);

async function waitForTile(tab, port, state) {
  await tab.waitForSelector(`li[data-port="${port}"][data-state="${state}"]`);
}

// Fills a form and confirms it in the dialog; resolves once the outcome is shown.
async function act(tab, form, port, bin) {
  await tab.$eval("#result", (result) => result.replaceChildren());
  await tab.$eval(`#${form}-port`, (input) => { input.value = ""; });
  await tab.$eval(`#${form}-bin`, (input) => { input.value = ""; });
  await tab.type(`#${form}-port`, String(port));
  await tab.type(`#${form}-bin`, String(bin));
  // By keyboard: Enter submits the form; the dialog opens on Back, so that a stray Enter sends
  // nothing, and Shift+Tab reaches the confirm button.
  await tab.focus(`#${form}-bin`);
  await tab.keyboard.press("Enter");
  await tab.waitForSelector("#confirm[open]");
  assert.equal(await tab.evaluate(() => document.activeElement.id), "confirm-no");
  await tab.keyboard.down("Shift");
  await tab.keyboard.press("Tab");
  await tab.keyboard.up("Shift");
  assert.equal(await tab.evaluate(() => document.activeElement.id), "confirm-yes");
  await tab.keyboard.press("Enter");
  await tab.waitForSelector("#result:not(.sending) h3");
  return tab.$eval("#result", (result) => result.innerText);
}

// === the tests ===

describe("the console against the gateway and the simulator", bounded, () => {
  let simulator;
  let upstream;
  let proxy;
  let gateway;
  let tab;
  let errors;
  let calls;

  before(async () => {
    simulator = await startProcess(
      ["simulate", "--listen", "127.0.0.1:0", "--log-publisher-listen", "127.0.0.1:0"],
      [/simulated controller listening url=(\S+)/, /simulated Log Publisher listening address=(\S+)/],
    );
    const [url, logPublisher] = simulator.found;
    upstream = await startProxy(new URL(url).host);
    proxy = await startProxy(logPublisher);
    gateway = await startProcess(
      ["serve", "--upstream", url.replace(new URL(url).host, upstream.address), "--log-publisher", proxy.address,
        "--listen", "127.0.0.1:0", "--retry-delay", RETRY_DELAY, "--console", "--console-ports", "1,2,3,4"],
      [LISTENING],
    );
    ({ tab, errors, calls } = await openConsole(gateway.found[0]));
  });

  after(async () => {
    await tab?.close();
    await gateway?.stop();
    await proxy?.close();
    await upstream?.close();
    await simulator?.stop();
  });

  test("the page loads with a tile per port, and no errors", async () => {
    await waitForTile(tab, 4, "NOOP");
    await waitForTile(tab, 3, "NOOP");
    const ports = await tab.$$eval("#tiles li", (tiles) => tiles.map((tile) => tile.dataset.port));
    assert.deepEqual(ports, ["1", "2", "3", "4"]);
    // Without auth, there is no token field.
    assert.equal(await tab.$eval("#token-form", (form) => getComputedStyle(form).display), "none");
    // Port 1 is not an AutoCase port: its tile says so, by the fault's name.
    await tab.waitForFunction(() => document.querySelector('li[data-port="1"]').innerText.includes("1087"));
    // ...with what to do about it, and the request id to quote.
    const refused = await tab.$eval('li[data-port="1"]', (tile) => tile.innerText);
    assert.match(refused, /Retry: not advised; do not retry until the port's state changes\./);
    // The tile is too narrow for FAILED_PRECONDITION on one line: it wraps between words.
    assert.match(refused, /^Port 1\nFAILED_\s*PRECONDITION\n1087 PORT_IS_NOT_AUTOCASE\n/);
    const wordsBroken = await tab.$eval('li[data-port="1"]', (tile) => {
      const broken = [];
      for (const part of tile.querySelectorAll(".code, .name")) {
        for (const word of part.innerText.split(/[\s_]+/)) {
          const walker = document.createTreeWalker(part, NodeFilter.SHOW_TEXT);
          for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            const start = node.data.indexOf(word);
            if (start < 0 || word === "") continue;
            const range = document.createRange();
            range.setStart(node, start);
            range.setEnd(node, start + word.length);
            const lines = new Set([...range.getClientRects()].map((rect) => Math.round(rect.top)));
            if (lines.size > 1) broken.push(word);
          }
        }
      }
      return broken;
    });
    assert.deepEqual(wordsBroken, []);
    assert.match(refused, /Request id [0-9a-f-]{36}\./);
    assertStateReadsFollowAnOpenWatch(calls);
    // The gateway's --upstream-timeout (10 s by default) and its margin, from config.json: the
    // gateway, not the page, ends a call the controller is slow to answer.
    assert.deepEqual([...calls.deadlines], ["12000m"]);
    assert.deepEqual(errors, []);
  });

  test("the footer links the licenses of every package the script bundles", async () => {
    const response = await fetchLicenses(tab, gateway.found[0]);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(response.headers.get("cache-control"), "public, max-age=31536000, immutable");
    const licenses = await response.text();
    const { dependencies } = JSON.parse(readFileSync(join(here, "..", "package.json"), "utf8"));
    assert.deepEqual(Object.keys(dependencies).sort(), ["@bufbuild/protobuf", "@connectrpc/connect", "@connectrpc/connect-web"]);
    for (const [name, version] of Object.entries(dependencies)) {
      const { license } = JSON.parse(readFileSync(join(here, "..", "node_modules", name, "package.json"), "utf8"));
      assert.ok(licenses.includes(`\n${name} ${version}: ${license}\n`), `${name} ${version} is not listed:\n${licenses}`);
    }
    assert.match(licenses, /=== Apache-2\.0 ===\n\n\s+Apache License\n\s+Version 2\.0, January 2004/);
    assert.match(licenses, /=== BSD-3-Clause ===\n\nCopyright 2008 Google Inc\.  All rights reserved\./);
    assert.deepEqual(errors, []);
  });

  test("an extraction goes EREQ, ERSO, ECMP on its tile; a second one at once shows fault 1148", async () => {
    const accepted = await act(tab, "extract", 4, 101337);
    assert.match(accepted, /ok: case_extract port 4 bin 101337: the controller accepted the case extraction/);
    assert.match(accepted, /Request id\s+[0-9a-f-]{36}/);
    await waitForTile(tab, 4, "EREQ");
    const refused = await act(tab, "extract", 4, 101337);
    assert.match(refused, /failed: case_extract port 4 bin 101337: UNAVAILABLE/);
    assert.match(refused, /Fault\s+1148 PREVIOUS_ACTION_NOT_COMPLETED/);
    assert.match(refused, /Meaning\s+New action cannot be started until the previous action has been completed\./);
    // The retry line as `taskgate case-extract` prints it, then the fault table's advice.
    assert.match(refused, /Retry\s+safe after 700ms\n/);
    assert.match(refused, /Advice\s+retry after the RetryInfo delay; the controller did not start the action\n/);
    assert.match(refused, /Request id\s+[0-9a-f-]{36}/);
    // A definite refusal: a repeat with the same key would only get it again.
    assert.equal(await tab.$("#repeat"), null);
    mkdirSync(dirname(screenshot), { recursive: true });
    await tab.screenshot({ path: screenshot, fullPage: true });
    await waitForTile(tab, 4, "ERSO");
    await waitForTile(tab, 4, "ECMP");
    const timeline = await tab.$eval("#timeline", (list) => list.innerText);
    for (const state of ["EREQ (EXTRACTION_REQUESTED)", "ERSO (EXTRACTION_READY_TO_SEND)", "ECMP (EXTRACTION_COMPLETED)"]) {
      assert.match(timeline, new RegExp(`port 4 bin 101337 ${state.replace(/[()]/g, "\\$&")}`));
    }
    assert.deepEqual(errors, []);
  });

  test("a cancel returns the port to NOOP, keeping the bin", async () => {
    await act(tab, "extract", 4, 101337);
    await waitForTile(tab, 4, "EREQ");
    const cancelled = await act(tab, "cancel", 4, 101337);
    assert.match(cancelled, /ok: case_cancel port 4 bin 101337: the controller accepted the cancel/);
    await waitForTile(tab, 4, "NOOP");
    assert.match(await tab.$eval('li[data-port="4"]', (tile) => tile.innerText), /bin 101337/);
    assert.match(await tab.$eval("#timeline", (list) => list.innerText), /port 4 bin 101337 CR \(CANCEL_REQUEST\)/);
    assert.deepEqual(errors, []);
  });

  test("while a call is in flight it says so with its key, and no other can be sent", async () => {
    await waitForTile(tab, 4, "NOOP");
    // The controller's answer is kept back: the call stays in flight.
    upstream.hold();
    try {
      await tab.$eval("#extract-port", (input) => { input.value = "4"; });
      await tab.$eval("#extract-bin", (input) => { input.value = "101337"; });
      await tab.focus("#extract-bin");
      await tab.keyboard.press("Enter");
      await tab.waitForSelector("#confirm[open]");
      await tab.click("#confirm-yes");
      await tab.waitForSelector("#result.sending h3");
      const [key] = (await calls.keys()).slice(-1);
      assert.equal(await tab.$eval("#result h3", (title) => title.innerText),
        `sending: case_extract port 4 bin 101337 (idempotency key ${key})`);
      assert.deepEqual(await tab.$$eval("form.action button[type=submit]", (buttons) => buttons.map((button) => button.disabled)), [true, true]);
      await tab.$eval("#cancel-port", (input) => { input.value = "4"; });
      await tab.$eval("#cancel-bin", (input) => { input.value = "101337"; });
      await tab.focus("#cancel-bin");
      await tab.keyboard.press("Enter");
      assert.equal(await tab.$("#confirm[open]"), null);
    } finally {
      upstream.release();
    }
    await tab.waitForSelector("#result:not(.sending) h3");
    assert.match(await tab.$eval("#result h3", (title) => title.innerText), /^ok: case_extract port 4 bin 101337/);
    assert.deepEqual(await tab.$$eval("form.action button[type=submit]", (buttons) => buttons.map((button) => button.disabled)), [false, false]);
    await waitForTile(tab, 4, "EREQ");
    await act(tab, "cancel", 4, 101337);
    await waitForTile(tab, 4, "NOOP");
    assert.deepEqual(errors, []);
  });

  test("Back sends nothing", async () => {
    await tab.$eval("#result", (result) => result.replaceChildren());
    await tab.$eval("#extract-port", (input) => { input.value = "4"; });
    await tab.$eval("#extract-bin", (input) => { input.value = "101337"; });
    await tab.focus("#extract-bin");
    await tab.keyboard.press("Enter");
    await tab.waitForSelector("#confirm[open]");
    await tab.keyboard.press("Escape");
    await tab.waitForSelector("#confirm:not([open])");
    assert.equal(await tab.$eval("#result", (result) => result.innerText), "");
    assert.equal(await tileState(tab, 4), "NOOP");
  });

  test("an out-of-range port is refused by the gateway, naming the field", async () => {
    const refused = await act(tab, "extract", 2001, 101337);
    assert.match(refused, /failed: case_extract port 2001 bin 101337: INVALID_ARGUMENT/);
    assert.match(refused, /Reason\s+INVALID_PARAMETER/);
    assert.match(refused, /Field\s+port_id: /);
    assert.match(refused, /Retry\s+not advised\n/);
    assert.match(refused, /Advice\s+no; fix the request\n/);
    assert.equal(await tab.$("#repeat"), null);
    assert.deepEqual(errors, []);
  });

  test("a Log Publisher outage shows the banner, and the tiles recover when it returns", async () => {
    proxy.cut();
    await tab.waitForSelector("#banner:not([hidden])");
    const banner = await tab.$eval("#banner", (element) => element.innerText);
    assert.match(banner, /LOG_PUBLISHER_UNAVAILABLE/);
    // The wait is the gateway's RetryInfo delay (--retry-delay), not the page's own backoff.
    assert.match(banner, /watching again in 0\.7s/);
    assert.match(banner, /Request id [0-9a-f-]{36}/);
    await tab.waitForSelector('li[data-port="4"].stale');
    proxy.restore();
    await tab.waitForSelector("#banner[hidden]");
    await tab.waitForSelector('li[data-port="4"][data-state="NOOP"]:not(.stale)');
    // Read again only once the new watch is open.
    assert.ok(calls.list().filter((call) => call === "watch opened").length > 1, calls.list().join(", "));
    assertStateReadsFollowAnOpenWatch(calls);
    // Live again: a new extraction shows on the tile.
    await act(tab, "extract", 4, 101337);
    await waitForTile(tab, 4, "EREQ");
    assert.deepEqual(errors, []);
  });

  test("a state read that failed is tried again until the port can be read", async () => {
    // The last extraction's end: no event comes for port 4 after it, so only a read can tell it.
    await waitForTile(tab, 4, "ECMP");
    upstream.cut();
    proxy.cut();
    await tab.waitForSelector('li[data-port="4"].stale');
    proxy.restore();
    // Watching again, the page reads every port, and the controller cannot be reached.
    await tab.waitForSelector('li[data-port="4"].error');
    const failed = await tab.$eval('li[data-port="4"]', (tile) => tile.innerText);
    // The proxy takes the gateway's connections and closes them at once.
    assert.match(failed, /^Port 4\nUNKNOWN\nUPSTREAM_CONNECTION_LOST\ncase_getstate port 4: the connection to the controller failed: /);
    // The first backoff, 0.5 s ± 20 %.
    assert.match(failed, / Reading again in 0\.[4-6]s\. Request id [0-9a-f-]{36}\.$/);
    upstream.restore();
    await tab.waitForSelector('li[data-port="4"][data-state="ECMP"]:not(.stale)');
    assert.match(await tab.$eval('li[data-port="4"]', (tile) => tile.innerText), /bin 101337\nread at /);
    assertStateReadsFollowAnOpenWatch(calls);
    assert.deepEqual(errors, []);
  });

  test("after an outcome whose advice is to read the port, no Repeat is offered; the key is shown", async () => {
    await waitForTile(tab, 4, "ECMP");
    // The gateway's connection to the controller ends before any answer: did the robot move?
    upstream.cut();
    try {
      const lost = await act(tab, "extract", 4, 101337);
      assert.match(lost, /^failed: case_extract port 4 bin 101337: UNKNOWN\n/);
      assert.match(lost, /Reason\s+UPSTREAM_CONNECTION_LOST\n/);
      assert.match(lost, /Advice\s+no; read the port with CaseGetState first\n/);
      assert.match(lost, /Idempotency key\s+[0-9a-f-]{36}/);
      assert.equal(await tab.$("#repeat"), null);
    } finally {
      upstream.restore();
    }
    assert.deepEqual(errors, []);
  });
});

describe("the console when its watch lags", bounded, () => {
  // The fewest events a watch may fall behind (--watch-buffer's least value).
  const WATCH_BUFFER = 16;
  let simulator;
  let proxy;
  let gateway;
  let tab;
  let errors;
  let calls;

  before(async () => {
    simulator = await startProcess(
      ["simulate", "--listen", "127.0.0.1:0", "--log-publisher-listen", "127.0.0.1:0"],
      [/simulated controller listening url=(\S+)/, /simulated Log Publisher listening address=(\S+)/],
    );
    const [url, logPublisher] = simulator.found;
    proxy = await startProxy(logPublisher);
    gateway = await startProcess(
      ["serve", "--upstream", url, "--log-publisher", proxy.address, "--listen", "127.0.0.1:0",
        "--retry-delay", RETRY_DELAY, "--watch-buffer", String(WATCH_BUFFER), "--console", "--console-ports", "1,2,3,4"],
      [LISTENING],
    );
    ({ tab, errors, calls } = await openConsole(gateway.found[0]));
  });

  after(async () => {
    await tab?.close();
    await gateway?.stop();
    await proxy?.close();
    await simulator?.stop();
  });

  test("more events at once than the watch buffer shows the lag banner, then the tiles are right again", async () => {
    await waitForTile(tab, 4, "NOOP");
    await tab.waitForSelector("#banner[hidden]");
    // Extractions and cancels on port 4, each 1 or 2 events (EREQ; CR and NOOP), whose lines the
    // Log Publisher proxy keeps back, then hands the gateway in one read: more than a watch's
    // buffer before its stream can take any.
    const client = createClient(TaskService, createGrpcWebTransport({ baseUrl: `http://${gateway.found[0]}` }));
    const call = { portId: 4, binId: 101337 };
    proxy.hold();
    let lagged;
    try {
      const pairs = WATCH_BUFFER / 2 + 1;
      for (let pair = 0; pair < pairs; pair += 1) {
        await client.caseExtract({ ...call, requestId: randomUUID() });
        await client.caseCancel({ ...call, requestId: randomUUID() });
      }
      await client.caseExtract({ ...call, requestId: randomUUID() });
      const events = pairs * 3 + 1;
      assert.ok(events > WATCH_BUFFER);
      await proxy.heldLines(/^AC,/, events);
      lagged = tab.waitForFunction(
        () => document.getElementById("banner").innerText.includes("WATCH_LAGGED"),
        { polling: "mutation" },
      );
    } finally {
      proxy.release();
    }
    await lagged;
    assert.match(await tab.$eval("#banner", (element) => element.innerText), /fell behind the events \(WATCH_LAGGED\)/);
    // The page watches again, reads the state, and follows the extraction to its end.
    await tab.waitForSelector("#banner[hidden]");
    await tab.waitForSelector('li[data-port="4"][data-state="ECMP"]:not(.stale)');
    assertStateReadsFollowAnOpenWatch(calls);
    assert.deepEqual(errors, []);
  });
});

describe("the console of more ports than it reads at once", bounded, () => {
  const PORTS = Array.from({ length: 12 }, (_, index) => index + 1);
  let gateway;
  let tab;
  let errors;
  let reads;

  before(async () => {
    gateway = await startProcess(
      ["serve", "--simulator", "--listen", "127.0.0.1:0", "--console-ports", PORTS.join(",")],
      [LISTENING],
    );
    ({ tab, errors, reads } = await openConsole(gateway.found[0]));
  });

  after(async () => {
    await tab?.close();
    await gateway?.stop();
  });

  test("reads at most 4 ports at a time, and every tile gets its answer", async () => {
    // Ports 5 to 12 are not in the simulator's layout: each tile shows the fault.
    await tab.waitForFunction(
      (count) => document.querySelectorAll("#tiles li[data-state], #tiles li.error").length === count,
      {}, PORTS.length,
    );
    assert.match(await tab.$eval('li[data-port="12"]', (tile) => tile.innerText), /^Port 12\nNOT_FOUND\n1000 PORT_IS_NOT_AVAILABLE\n/);
    assert.ok(reads.most <= 4 && reads.most > 1, `${reads.most} state reads were under way at once`);
    assert.deepEqual(errors, []);
  });
});

describe("the console when the gateway cannot be reached", bounded, () => {
  let gateway;
  let frontDoor;
  let tab;
  let errors;
  let calls;

  before(async () => {
    gateway = await startProcess(["serve", "--simulator", "--listen", "127.0.0.1:0"], [LISTENING]);
    // The page is served through a proxy, which can take the gateway away from it.
    frontDoor = await startProxy(gateway.found[0]);
    ({ tab, errors, calls } = await openConsole(frontDoor.address));
  });

  after(async () => {
    await tab?.close();
    await frontDoor?.close();
    await gateway?.stop();
  });

  test("says so instead of the browser's words, keeps trying, and resumes", async () => {
    await waitForTile(tab, 4, "NOOP");
    assert.deepEqual(errors, []);
    frontDoor.cut();
    await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("cannot be reached"));
    assert.equal(await tab.$eval("#banner", (element) => element.innerText),
      "The gateway cannot be reached; trying again within 10s. Tiles may be out of date.");
    // A screen reader reads the banner at each change: trying again is no news.
    await tab.$eval("#banner", (banner) => {
      window.bannerChanges = 0;
      new MutationObserver(() => { window.bannerChanges += 1; })
        .observe(banner, { childList: true, characterData: true, subtree: true });
    });
    // Each try fetches the page's settings, or watches once it has them.
    const tries = () => calls.list().filter((call) => call === "watch sent" || call === "settings read sent").length;
    await grows(tries, tries() + 1, () => `the page did not try again: ${calls.list().join(", ")}`);
    assert.equal(await tab.evaluate(() => window.bannerChanges), 0);
    await tab.waitForSelector('li[data-port="4"].stale');
    const refused = await act(tab, "extract", 4, 101337);
    assert.match(refused, /^failed: case_extract port 4 bin 101337: the gateway cannot be reached\n/);
    assert.match(refused, /Message\s+the gateway cannot be reached: the browser got no answer from 127\.0\.0\.1:\d+ \(Failed to fetch\)/);
    frontDoor.restore();
    await tab.waitForSelector("#banner[hidden]");
    await tab.waitForSelector('li[data-port="4"][data-state="NOOP"]:not(.stale)');
    // The browser reports each request the cut ended, and nothing else.
    assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
  });

  // How many watches the page has sent.
  const watches = () => calls.list().filter((call) => call === "watch sent").length;

  // Extracts from bin 101337 at port 4 while the gateway cannot be reached, so that the page
  // gets no answer at all; resolves with the outcome shown, once the gateway is back.
  async function extractWithNoAnswer() {
    frontDoor.cut();
    const lost = await act(tab, "extract", 4, 101337);
    assert.match(lost, /^failed: case_extract port 4 bin 101337: the gateway cannot be reached\n/);
    frontDoor.restore();
    await tab.waitForSelector("#banner[hidden]");
    return lost;
  }

  test("after no answer at all, Repeat sends the same key, said so in its dialog; a new call does not", async () => {
    await waitForTile(tab, 4, "NOOP");
    const lost = await extractWithNoAnswer();
    const key = /Idempotency key\s+([0-9a-f-]{36})/.exec(lost)?.[1];
    assert.ok(key, lost);
    await tab.click("#repeat");
    await tab.waitForSelector("#confirm[open]");
    assert.equal(await tab.$eval("#confirm-text", (text) => text.innerText),
      `Repeat this call with the same idempotency key ${key}? Extract a case from bin 101337 at port 4? A robot will move.`);
    await tab.$eval("#result", (result) => result.replaceChildren());
    await tab.click("#confirm-yes");
    await tab.waitForSelector("#result:not(.sending) h3");
    // The first call never reached the gateway, so the repeat is the one it acts on.
    assert.match(await tab.$eval("#result h3", (title) => title.innerText),
      /^ok: case_extract port 4 bin 101337: the controller accepted the case extraction$/);
    await waitForTile(tab, 4, "EREQ");
    await act(tab, "cancel", 4, 101337);
    const keys = await calls.keys();
    assert.deepEqual(keys.slice(-3, -1), [key, key]);
    assert.notEqual(keys.at(-1), key);
    assert.match(keys.at(-1), /^[0-9a-f-]{36}$/);
    await waitForTile(tab, 4, "NOOP");
    assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
  });

  test("while a Repeat checks the gateway, no other call can be started", async () => {
    await waitForTile(tab, 4, "NOOP");
    await extractWithNoAnswer();
    // The repeat's own read of the settings is kept back until the test lets it go.
    const held = [];
    let heldOne;
    const settingsHeld = new Promise((resolveHeld) => { heldOne = resolveHeld; });
    const hold = (request) => {
      if (request.isInterceptResolutionHandled()) return;
      if (new URL(request.url()).pathname === "/console/config.json") {
        held.push(request);
        heldOne();
      } else {
        request.continue();
      }
    };
    await tab.setRequestInterception(true);
    tab.on("request", hold);
    try {
      await tab.click("#repeat");
      await tab.waitForSelector("#confirm[open]");
      await tab.click("#confirm-yes");
      await within(settingsHeld, SHOW_LIMIT_MS, () => "the repeat did not read the gateway's settings");
      assert.match(await tab.$eval("#result h3", (title) => title.innerText), /^checking the gateway before repeating: /);
      assert.equal(await tab.$eval("#extract-form button[type=submit]", (button) => button.disabled), true);
      // A submit by keyboard opens no dialog: its handler runs at once, and refuses.
      await tab.$eval("#cancel-port", (input) => { input.value = "4"; });
      await tab.$eval("#cancel-bin", (input) => { input.value = "101337"; });
      await tab.$eval("#cancel-form", (form) => form.requestSubmit());
      assert.equal(await tab.$("#confirm[open]"), null);
      for (const request of held) await request.continue();
      await tab.waitForSelector("#result:not(.sending) h3");
      assert.match(await tab.$eval("#result h3", (title) => title.innerText),
        /^ok: case_extract port 4 bin 101337: the controller accepted the case extraction$/);
    } finally {
      tab.off("request", hold);
      await tab.setRequestInterception(false);
      for (const request of held) if (!request.isInterceptResolutionHandled()) await request.continue();
    }
    await waitForTile(tab, 4, "EREQ");
    await act(tab, "cancel", 4, 101337);
    await waitForTile(tab, 4, "NOOP");
  });

  test("a Repeat after the gateway restarted is refused, and nothing is sent", async () => {
    await waitForTile(tab, 4, "NOOP");
    const other = await startProcess(["serve", "--simulator", "--listen", "127.0.0.1:0"], [LISTENING]);
    try {
      frontDoor.cut();
      const lost = await act(tab, "extract", 4, 101337);
      assert.match(lost, /^failed: case_extract port 4 bin 101337: the gateway cannot be reached\n/);
      const sent = (await calls.keys()).length;
      // Another gateway process at the same address: it never saw the key.
      frontDoor.retarget(other.found[0]);
      frontDoor.restore();
      await repeatTheCall();
      assert.equal(await tab.$eval("#result h3", (title) => title.innerText),
        "not sent: the gateway restarted (or no longer remembers this key after --idempotency-window): read the port's tile and decide");
      assert.equal((await calls.keys()).length, sent);
      assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
    } finally {
      frontDoor.cut();
      frontDoor.retarget(gateway.found[0]);
      frontDoor.restore();
      await other.stop();
    }
  });

  test("a page loaded while the gateway cannot be reached starts by itself once it can", async () => {
    let refusing = true;
    const late = await openConsole(frontDoor.address, async (tab) => {
      await tab.setRequestInterception(true);
      // The page and its files came from the cache; the gateway is gone before its settings.
      tab.on("request", (request) => {
        if (refusing && new URL(request.url()).pathname === "/console/config.json") request.abort("connectionrefused");
        else request.continue();
      });
    });
    try {
      await late.tab.waitForFunction(() => document.getElementById("banner").innerText.includes("cannot be reached"));
      assert.equal(await late.tab.$eval("#banner", (element) => element.innerText),
        "The gateway cannot be reached; trying again within 10s.");
      refusing = false;
      await waitForTile(late.tab, 4, "NOOP");
      await late.tab.waitForSelector("#banner[hidden]");
      assert.deepEqual(late.errors.filter((error) => !/net::ERR_/.test(error)), []);
    } finally {
      await late.tab.close();
    }
  });

  test("the page waits no longer than the banner says between tries, whatever the jitter", async () => {
    // Doubling from the first backoff (0.5 s), the waits reach their cap within ten.
    const TRIES = 10;
    const late = await openConsole(frontDoor.address, async (tab) => {
      // The largest jitter every time, and each of the first TRIES waits recorded and then
      // skipped, so the backoff reaches its cap at once instead of after half a minute. The
      // waits after them are the page's own, so that it does not try again at once, over and
      // over, until its tab is closed.
      await tab.evaluateOnNewDocument((tries) => {
        Math.random = () => 0.9999;
        window.waits = [];
        const setTimer = window.setTimeout;
        window.setTimeout = (callback, ms, ...rest) => {
          if (window.waits.length >= tries) return setTimer(callback, ms, ...rest);
          window.waits.push(ms);
          return setTimer(callback, 0, ...rest);
        };
      }, TRIES);
      await tab.setRequestInterception(true);
      tab.on("request", (request) => {
        if (new URL(request.url()).pathname === "/console/config.json") request.abort("connectionrefused");
        else request.continue();
      });
    });
    try {
      await late.tab.waitForFunction((tries) => window.waits.length >= tries, {}, TRIES);
      assert.equal(await late.tab.$eval("#banner", (element) => element.innerText),
        "The gateway cannot be reached; trying again within 10s.");
      const waits = await late.tab.evaluate(() => window.waits);
      assert.equal(Math.max(...waits), 10000, waits.join());
    } finally {
      await late.tab.close();
    }
  });

  test("a refusal no token can cure tells the operator to reload once it is fixed", async () => {
    const settings = await (await fetch(`http://${frontDoor.address}/console/config.json`)).json();
    const late = await openConsole(frontDoor.address, async (tab) => {
      await tab.setRequestInterception(true);
      // Settings naming a port the gateway refuses to watch: the watch gets INVALID_ARGUMENT.
      tab.on("request", (request) => {
        if (new URL(request.url()).pathname === "/console/config.json") {
          request.respond({ status: 200, contentType: "application/json", body: JSON.stringify({ ...settings, ports: [4, 2001] }) });
        } else {
          request.continue();
        }
      });
    });
    try {
      await late.tab.waitForFunction(() => document.getElementById("banner").innerText.includes("INVALID_ARGUMENT"));
      assert.match(await late.tab.$eval("#banner", (element) => element.innerText),
        /\(INVALID_ARGUMENT INVALID_PARAMETER\)\. Reload the page once the cause is fixed\. Request id [0-9a-f-]{36}\.$/);
    } finally {
      await late.tab.close();
    }
  });

  test("a page whose settings a proxy answers with 502 says so, and starts once they come", async () => {
    let failing = true;
    const late = await openConsole(frontDoor.address, async (tab) => {
      await tab.setRequestInterception(true);
      // A reverse proxy while the gateway is away: an HTTP error, not a failed fetch.
      tab.on("request", (request) => {
        if (failing && new URL(request.url()).pathname === "/console/config.json") {
          request.respond({ status: 502, contentType: "text/plain", body: "bad gateway" });
        } else {
          request.continue();
        }
      });
    });
    try {
      await late.tab.waitForFunction(() => document.getElementById("banner").innerText.includes("HTTP 502"));
      assert.equal(await late.tab.$eval("#banner", (element) => element.innerText),
        "The console's settings could not be read (/console/config.json answered HTTP 502); trying again within 10s.");
      failing = false;
      await waitForTile(late.tab, 4, "NOOP");
      await late.tab.waitForSelector("#banner[hidden]");
      assert.deepEqual(late.errors.filter((error) => !/net::ERR_|502/.test(error)), []);
    } finally {
      await late.tab.close();
    }
  });

  test("a page whose settings come malformed with HTTP 200 says what is wrong, and starts once they come right", async () => {
    const settings = await (await fetch(`http://${frontDoor.address}/console/config.json`)).json();
    // What a misconfigured proxy might answer with HTTP 200, in turn, and what the banner names.
    const json = (value) => ({ body: JSON.stringify(value), contentType: "application/json" });
    const malformed = [
      [json({ error: "no route to the gateway" }), "ports is missing"],
      [json({ ...settings, ports: [4, "5"] }), "ports[1] is a string, not a port number (0 to 4294967295)"],
      [json({ ...settings, ports: [] }), "ports is an empty list, not a list of at least one port"],
      [json({ ...settings, ports: [4, 3, 4] }), "ports[2] repeats port 4"],
      [json({ ...settings, faults: { ...settings.faults, 1087: { ...settings.faults[1087], mayHaveActed: "no" } } }),
        'faults["1087"].mayHaveActed is a string, not true or false'],
      [json([]), "the answer is an empty list, not an object"],
      // Not JSON at all: the parser's own words, whatever the browser's are.
      [{ body: "<html>No route</html>", contentType: "text/html" }, /^\/console\/config\.json: .*JSON/],
    ];
    let answer = malformed[0][0];
    const late = await openConsole(frontDoor.address, async (tab) => {
      await tab.setRequestInterception(true);
      tab.on("request", (request) => {
        if (answer !== null && new URL(request.url()).pathname === "/console/config.json") {
          request.respond({ status: 200, ...answer });
        } else {
          request.continue();
        }
      });
    });
    // Waits until the banner says the settings could not be read for `wrong` (a RegExp for what
    // the browser words), then `after` (what a page that has started adds).
    const bannerSays = (wrong, after = "") => late.tab.waitForFunction((source, flags, text, tail) => {
      const banner = document.getElementById("banner").innerText;
      const prefix = "The console's settings could not be read (";
      const suffix = `); trying again within 10s.${tail}`;
      if (!banner.startsWith(prefix) || !banner.endsWith(suffix)) return false;
      const why = banner.slice(prefix.length, banner.length - suffix.length);
      return source === null ? why === text : new RegExp(source, flags).test(why);
    }, {}, wrong instanceof RegExp ? wrong.source : null, wrong instanceof RegExp ? wrong.flags : "",
    wrong instanceof RegExp ? null : `/console/config.json: ${wrong}`, after)
      .catch(async (error) => {
        throw new Error(`${error.message}: the banner says ${JSON.stringify(await late.tab.$eval("#banner", (element) => element.innerText))}`);
      });
    try {
      // Each is read again, with the same backoff as an answer that is not JSON at all.
      for (const [body, wrong] of malformed) {
        answer = body;
        await bannerSays(wrong);
      }
      answer = null;
      await waitForTile(late.tab, 4, "NOOP");
      await late.tab.waitForSelector("#banner[hidden]");
      // Once started, settings read again after the watch failed are named as the settings,
      // not as a watch that failed: no watch was sent.
      answer = malformed[0][0];
      frontDoor.cut();
      try {
        await bannerSays("ports is missing", " Tiles may be out of date.");
      } finally {
        frontDoor.restore();
      }
      answer = null;
      await late.tab.waitForSelector("#banner[hidden]");
      await waitForTile(late.tab, 4, "NOOP");
      assert.deepEqual(late.errors.filter((error) => !/net::ERR_/.test(error)), []);
    } finally {
      await late.tab.close();
    }
    await tab.waitForSelector("#banner[hidden]");
  });

  test("after an outage, a gateway with other ports at the same address gets tiles of its own", async () => {
    await waitForTile(tab, 4, "NOOP");
    const other = await startProcess(
      ["serve", "--simulator", "--listen", "127.0.0.1:0", "--console-ports", "3,2"],
      [LISTENING],
    );
    try {
      frontDoor.cut();
      await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("cannot be reached"));
      frontDoor.retarget(other.found[0]);
      frontDoor.restore();
      await tab.waitForSelector("#banner[hidden]");
      await tab.waitForFunction(() => [...document.querySelectorAll("#tiles li")].map((tile) => tile.dataset.port).join() === "3,2");
      await waitForTile(tab, 2, "NOOP");
      assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
    } finally {
      frontDoor.cut();
      frontDoor.retarget(gateway.found[0]);
      frontDoor.restore();
      await other.stop();
    }
  });

  // Extracts from `bin` at `port` and loses the answer: the gateway answers, but the front door
  // keeps it back, then cuts the connection, so the page gets no answer at all. Resolves once
  // the page has said so and watches again, the front door open whatever happened.
  async function extractLosingTheAnswer(port, bin) {
    // Quiet first: every tile read (a state, or an error no read again can cure, as port 1's
    // PORT_IS_NOT_AUTOCASE) and live, so that the only answer the front door holds is the
    // extraction's.
    await tab.waitForSelector("#banner[hidden]");
    await tab.waitForFunction(() => [...document.querySelectorAll("#tiles li")]
      .every((tile) => !tile.classList.contains("stale")
        && (tile.dataset.state || (tile.classList.contains("error") && !tile.innerText.includes("Reading again")))));
    const watchesBefore = watches();
    frontDoor.hold();
    try {
      try {
        await tab.$eval("#extract-port", (input, value) => { input.value = value; }, String(port));
        await tab.$eval("#extract-bin", (input, value) => { input.value = value; }, String(bin));
        await tab.focus("#extract-bin");
        await tab.keyboard.press("Enter");
        await tab.waitForSelector("#confirm[open]");
        await tab.click("#confirm-yes");
        await frontDoor.heldLines(/^HTTP\/1\.1 200/, 1);
        frontDoor.cut();
      } finally {
        frontDoor.release();
      }
      await tab.waitForSelector("#result:not(.sending) h3");
      assert.match(await tab.$eval("#result h3", (title) => title.innerText), /the gateway cannot be reached$/);
    } finally {
      frontDoor.restore();
    }
    // The cut ended the watch too: the page has watched again.
    await grows(watches, watchesBefore, () => `the page did not watch again after the cut: ${calls.list().join(", ")}`);
    await tab.waitForSelector("#banner[hidden]");
  }

  // Repeats the call the result offers to, and resolves with the repeat's outcome.
  async function repeatTheCall() {
    await tab.click("#repeat");
    await tab.waitForSelector("#confirm[open]");
    await tab.$eval("#result", (result) => result.replaceChildren());
    await tab.click("#confirm-yes");
    await tab.waitForSelector("#result:not(.sending) h3");
    return tab.$eval("#result", (result) => result.innerText);
  }

  test("a Repeat of a call whose answer was lost is answered from the first call, and says so", async () => {
    await waitForTile(tab, 4, "NOOP");
    await extractLosingTheAnswer(4, 101337);
    const repeated = await repeatTheCall();
    assert.equal(await tab.$eval("#result h3", (title) => title.innerText),
      "ok: case_extract port 4 bin 101337: answered from the first call; nothing new was sent", repeated);
    assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
  });

  test("a Repeat of a call whose fault was lost gets the first call's fault, and says nothing new was sent", async () => {
    await tab.waitForSelector("#banner[hidden]");
    // Port 1 is not an AutoCase port: the controller refuses the extraction with fault 1087, a
    // definite answer the gateway keeps for the key.
    await extractLosingTheAnswer(1, 101337);
    const repeated = await repeatTheCall();
    assert.equal(await tab.$eval("#result h3", (title) => title.innerText),
      "failed: case_extract port 1 bin 101337: FAILED_PRECONDITION, answered from the first call; nothing new was sent", repeated);
    assert.match(repeated, /Fault\s+1087 PORT_IS_NOT_AUTOCASE\n/);
    assert.match(repeated, /Request id\s+[0-9a-f-]{36}/);
    assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
  });

  test("tiles a Repeat's read of the settings builds for other ports are followed by the watch", async () => {
    await tab.waitForSelector("#banner[hidden]");
    // No operation under way at port 4, which a new extraction would meet (fault 1148).
    await tab.waitForSelector('li[data-port="4"][data-state="NOOP"], li[data-port="4"][data-state="ECMP"]');
    const settings = await (await fetch(`http://${frontDoor.address}/console/config.json`)).json();
    await extractLosingTheAnswer(4, 101337);
    // The settings the repeat reads name other ports, from the same gateway process.
    const answer = (request) => {
      if (request.isInterceptResolutionHandled()) return;
      if (new URL(request.url()).pathname === "/console/config.json") {
        request.respond({ status: 200, contentType: "application/json", body: JSON.stringify({ ...settings, ports: [4, 2] }) });
      } else {
        request.continue();
      }
    };
    await tab.setRequestInterception(true);
    tab.on("request", answer);
    try {
      const watchesBefore = watches();
      const repeated = await repeatTheCall();
      assert.match(repeated, /^ok: case_extract port 4 bin 101337: answered from the first call; nothing new was sent\n/);
      // The watch under way ended, and a new one was sent for the new tiles.
      await grows(watches, watchesBefore, () => `no watch followed the repeat: ${calls.list().join(", ")}`);
      await tab.waitForFunction(() => [...document.querySelectorAll("#tiles li")].map((tile) => tile.dataset.port).join() === "4,2");
      // The new tiles are read and follow the extraction to its end.
      await waitForTile(tab, 2, "NOOP");
      await waitForTile(tab, 4, "ECMP");
    } finally {
      tab.off("request", answer);
      await tab.setRequestInterception(false);
    }
    assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
  });
});

describe("the console when a restart turns auth on", bounded, () => {
  let gateway;
  let frontDoor;

  before(async () => {
    gateway = await startProcess(["serve", "--simulator", "--listen", "127.0.0.1:0"], [LISTENING]);
    frontDoor = await startProxy(gateway.found[0]);
  });

  after(async () => {
    await frontDoor?.close();
    await gateway?.stop();
  });

  test("shows the token form, and the tiles come back with the token", async () => {
    const { tab, errors } = await openConsole(frontDoor.address);
    const folder = mkdtempSync(join(tmpdir(), "taskgate-console-restart-"));
    const tokens = join(folder, "tokens");
    writeFileSync(tokens, "right-token\n");
    const guarded = await startProcess(
      ["serve", "--simulator", "--listen", "127.0.0.1:0", "--auth-tokens-file", tokens],
      [LISTENING],
    );
    try {
      await waitForTile(tab, 4, "NOOP");
      assert.equal(await tab.$eval("#token-form", (form) => form.hidden), true);
      // A restart as an operator makes one: the new gateway is up at once, and the old one ends
      // its watches as it shuts down (UNAVAILABLE), not with a connection the browser sees fail.
      frontDoor.retarget(guarded.found[0]);
      await gateway.stop();
      gateway = null;
      await tab.waitForSelector("#token-form:not([hidden])");
      await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("bearer token"));
      await tab.type("#token", "right-token");
      await tab.focus("#token");
      await tab.keyboard.press("Enter");
      await tab.waitForSelector("#banner[hidden]");
      await waitForTile(tab, 4, "NOOP");
      await tab.waitForSelector('li[data-port="4"]:not(.stale)');
      assert.deepEqual(errors.filter((error) => !/net::ERR_/.test(error)), []);
    } finally {
      await tab.close();
      await guarded.stop();
    }
  });
});

describe("the console with auth on", bounded, () => {
  let gateway;
  let tab;
  let errors;
  let calls;

  before(async () => {
    const folder = mkdtempSync(join(tmpdir(), "taskgate-console-auth-"));
    const tokens = join(folder, "tokens");
    writeFileSync(tokens, "right-token\n");
    gateway = await startProcess(
      ["serve", "--simulator", "--listen", "127.0.0.1:0", "--retry-delay", RETRY_DELAY, "--auth-tokens-file", tokens],
      [LISTENING],
    );
    ({ tab, errors, calls } = await openConsole(gateway.found[0]));
  });

  after(async () => {
    await tab?.close();
    await gateway?.stop();
  });

  test("without a token the page asks for one and stops calling; a wrong token shows UNAUTHENTICATED and the right one works", async () => {
    await tab.waitForSelector("#token-form:not([hidden])");
    await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("bearer token"));
    assert.match(await tab.$eval("#banner", (element) => element.innerText),
      /^Calls need a valid bearer token: enter one below\. Request id [0-9a-f-]{36}\.$/);
    // Watching again could not help, and each try is a warning in the gateway's log. Stopping
    // is the absence of calls, which only a window of time can show: 4 s, in which a backoff
    // from 0.5 s (doubling, ±20 %) would have watched at least 3 more times.
    await new Promise((resolveWait) => setTimeout(resolveWait, 4000));
    const watches = calls.list().filter((call) => call === "watch sent").length;
    assert.ok(watches <= 2, `${watches} watches: ${calls.list().join(", ")}`);
    assert.ok(!calls.list().includes("state read sent"), calls.list().join(", "));
    await tab.type("#token", "wrong-token");
    await tab.keyboard.press("Enter");
    // A wrong token gets an answer of its own, every time one is given.
    await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("was refused"));
    assert.match(await tab.$eval("#banner", (element) => element.innerText),
      /^The token given was refused \(UNAUTHENTICATED\): enter a valid one below\. Request id [0-9a-f-]{36}\.$/);
    await tab.$eval("#banner", (banner) => { window.bannerText = banner.innerText; });
    await tab.type("#token", "wrong-token");
    await tab.keyboard.press("Enter");
    await tab.waitForFunction(() => document.getElementById("banner").innerText !== window.bannerText);
    assert.match(await tab.$eval("#banner", (element) => element.innerText), /^The token given was refused/);
    const refused = await act(tab, "extract", 4, 101337);
    assert.match(refused, /failed: case_extract port 4 bin 101337: UNAUTHENTICATED/);
    assert.match(refused, /Reason\s+UNAUTHENTICATED/);
    assert.equal(await tileState(tab, 4), undefined);
    await tab.$eval("#token", (input) => { input.value = ""; });
    await tab.type("#token", "right-token");
    await tab.focus("#token");
    await tab.keyboard.press("Enter");
    await waitForTile(tab, 4, "NOOP");
    await tab.waitForSelector("#banner[hidden]");
    const accepted = await act(tab, "extract", 4, 101337);
    assert.match(accepted, /ok: case_extract port 4 bin 101337/);
    await waitForTile(tab, 4, "EREQ");
    // The token is kept in the tab's memory only.
    const stored = await tab.evaluate(() => [localStorage.length, sessionStorage.length, document.cookie]);
    assert.deepEqual(stored, [0, 0, ""]);
    assert.deepEqual(errors, []);
  });
});

describe("the console without a Log Publisher", bounded, () => {
  let gateway;
  let tab;
  let errors;

  before(async () => {
    gateway = await startProcess(["serve", "--simulator", "--log-publisher", "off", "--listen", "127.0.0.1:0"], [LISTENING]);
    ({ tab, errors } = await openConsole(gateway.found[0]));
  });

  after(async () => {
    await tab?.close();
    await gateway?.stop();
  });

  test("reads the tiles and says they are not live", async () => {
    await waitForTile(tab, 4, "NOOP");
    await tab.waitForFunction(() => document.getElementById("banner").innerText.includes("LOG_PUBLISHER_DISABLED"));
    assert.deepEqual(errors, []);
  });
});

describe("a page on another origin, as the README shows it", bounded, () => {
  let gateway;
  let site;

  after(async () => {
    await gateway?.stop();
    site?.closeAllConnections();
    await new Promise((resolveClose) => (site ? site.close(resolveClose) : resolveClose()));
  });

  test("calls the gateway with Connect-ES when its origin is allowed, and reads its errors", async () => {
    // The README's snippet itself, pointed at this test's gateway and generated code.
    const readme = readFileSync(join(root, "README.md"), "utf8");
    const snippet = /\*\*From a page on another origin\*\*[\s\S]*?```js\n([\s\S]*?)```/.exec(readme)?.[1];
    assert.ok(snippet, "README.md has no cross-origin snippet");
    site = createHttpServer();
    await new Promise((resolveListen) => site.listen(0, "127.0.0.1", resolveListen));
    const origin = `http://127.0.0.1:${site.address().port}`;
    gateway = await startProcess(
      ["serve", "--simulator", "--listen", "127.0.0.1:0", "--cors-allow-origin", origin],
      [LISTENING],
    );
    for (const text of ['"http://gateway:50051"', '"./gen/taskgate/v1/task_pb.js"', "{ portId: 4 }"]) {
      assert.ok(snippet.includes(text), `the README's snippet no longer has ${text}`);
    }
    const scripts = new Map();
    site.on("request", (request, response) => {
      const script = scripts.get(request.url.slice(1));
      if (script) {
        response.writeHead(200, { "content-type": "text/javascript" });
        response.end(script);
      } else {
        response.writeHead(200, { "content-type": "text/html" });
        response.end(`<!doctype html><title>ops</title><script type="module" src="${request.url}.js"></script>`);
      }
    });
    // What the snippet prints in a page of that origin, for `port`.
    const printedFor = async (port) => {
      const source = snippet
        .replace('"http://gateway:50051"', JSON.stringify(`http://${gateway.found[0]}`))
        .replace('"./gen/taskgate/v1/task_pb.js"', JSON.stringify(join(here, "..", "gen", "taskgate", "v1", "task_pb.js")))
        .replace("{ portId: 4 }", `{ portId: ${port} }`);
      const bundle = await esbuild.build({
        stdin: { contents: source, resolveDir: join(here, ".."), sourcefile: "readme-snippet.js" },
        bundle: true, format: "esm", target: "es2022", write: false, logLevel: "warning",
      });
      scripts.set(`port-${port}.js`, bundle.outputFiles[0].contents);
      const tab = await browser.newPage();
      try {
        const logged = [];
        const errors = [];
        tab.on("console", (message) => (message.type() === "error" ? errors : logged).push(message.text()));
        tab.on("pageerror", (error) => errors.push(error.message));
        const printed = new Promise((resolvePrinted) => tab.on("console", () => logged.length > 0 && resolvePrinted()));
        await tab.goto(`${origin}/port-${port}`, { waitUntil: "load" });
        await within(printed, SHOW_LIMIT_MS, () => `the snippet printed nothing; errors: ${errors.join("; ")}`);
        return { logged, errors };
      } finally {
        await tab.close();
      }
    };
    // Port 4 of the default layout, before any case operation: NOOP, no bin.
    assert.deepEqual(await printedFor(4), { logged: ["NOOP no bin"], errors: [] });
    // Port 1 is not an AutoCase port: the controller refuses to read it, fault 1087.
    assert.deepEqual(await printedFor(1), { logged: ["FailedPrecondition 1087"], errors: [] });
  });
});
