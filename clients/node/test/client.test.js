"use strict";
// The Node client against the real gateway: gRPC and gRPC-Web, success and every typed fault,
// cancel and case state, and WatchCaseEvents' server stream.

const { test, describe, before, after } = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const net = require("node:net");
const os = require("node:os");
const path = require("node:path");
const {
  TaskGate,
  TaskGateError,
  caseExtractGrpcWeb,
  watchCaseEventsGrpcWeb,
  grpcWebFrames,
  errorFromStatusDetails,
} = require("../client.js");
const { startGateway } = require("./gateway.js");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

let gateway;
let client;

before(async () => {
  gateway = await startGateway();
  client = new TaskGate(gateway.address);
});

after(async () => {
  client.close();
  assert.equal(await gateway.stop(), 0);
});

async function expectError(promise) {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof TaskGateError, String(error));
    return error;
  }
  assert.fail("the call succeeded");
}

test("success, then 1148 with the retry delay", async () => {
  assert.equal((await client.caseExtract(4, 101337, { requestId: "node-1" })).requestId, "node-1");
  const error = await expectError(client.caseExtract(4, 101337, { maxAttempts: 1 }));
  assert.equal(error.codeName, "UNAVAILABLE");
  assert.deepEqual([error.retryable, error.mayHaveActed, error.attempts], [true, false, 1]);
  assert.equal(error.faultCode, "FAULT_CODE_PREVIOUS_ACTION_NOT_COMPLETED");
  assert.equal(error.rawCode, 1148);
  assert.equal(error.retryDelayMs, 1500);
  assert.equal(error.domain, "autostore.task");
  assert.deepEqual(error.metadata, { faultCode: "1148", method: "case_extract", portId: "4", binId: "101337" });
});

// The request id of the gateway's access line for the call whose line passes `test`.
async function requestIdLogged(gateway, test) {
  const [line] = await gateway.linesLogged((line) => line.includes("taskgate::access") && test(line), 1);
  return / request_id=(\S+)/.exec(line)[1];
}

test("a failed call carries the request id of its access line", async () => {
  // Port 1 is not an AutoCase port: the controller refuses the call.
  const error = await expectError(client.caseExtract(1, 101337, { maxAttempts: 1 }));
  const logged = await requestIdLogged(gateway, (line) => line.includes(`idempotency_key=${error.idempotencyKey} `));
  assert.equal(error.requestId, logged);
  assert.ok(error.message.startsWith("FAILED_PRECONDITION: ") && error.message.endsWith(` (request id: ${logged})`), error.message);
  // One the caller sets is the one the gateway logs, and the one the error carries.
  const read = await expectError(client.caseGetState(1, { requestId: "node-failed-read" }));
  assert.equal(read.requestId, "node-failed-read");
  assert.match(String(read), /^TaskGateError: FAILED_PRECONDITION: .* \(request id: node-failed-read\)$/);
});

test("gRPC-Web: a failed call carries the request id of its access line", async () => {
  const headers = { "x-request-id": "node-web-failed" };
  const error = await expectError(caseExtractGrpcWeb(`http://${gateway.address}`, 1, 101337, { headers }));
  assert.equal(error.requestId, await requestIdLogged(gateway, (line) => line.includes(" request_id=node-web-failed ")));
  assert.match(error.message, /^FAILED_PRECONDITION: .* \(request id: node-web-failed\)$/);
});

test("a call that never reached the gateway has no request id", async () => {
  // Nothing listens there: the connection is refused, and no gateway named the call.
  const unreachable = new TaskGate(await unusedAddress());
  try {
    const error = await expectError(unreachable.caseGetState(4, { timeoutMs: 5000, maxAttempts: 1 }));
    assert.deepEqual([error.codeName, error.requestId], ["UNAVAILABLE", null]);
    assert.doesNotMatch(error.message, /request id/);
  } finally {
    unreachable.close();
  }
});

// A loopback address where nothing listens: bound, read, then released.
async function unusedAddress() {
  const listener = net.createServer();
  await new Promise((resolve) => listener.listen(0, "127.0.0.1", resolve));
  const { port } = listener.address();
  await new Promise((resolve) => listener.close(resolve));
  return `127.0.0.1:${port}`;
}

const SIMULATOR_FAULTS = [
  [1, "FAILED_PRECONDITION", "FAULT_CODE_PORT_IS_NOT_AUTOCASE", 1087],
  [2, "FAILED_PRECONDITION", "FAULT_CODE_PORT_NOT_IN_APPROPRIATE_MODE", 1099],
  [3, "FAILED_PRECONDITION", "FAULT_CODE_BIN_NOT_SELECTED_FOR_PORT", 1149],
  [9, "NOT_FOUND", "FAULT_CODE_PORT_IS_NOT_AVAILABLE", 1000],
];

function checkFault(error, [, codeName, faultCode, rawCode]) {
  assert.equal(error.codeName, codeName);
  assert.equal(error.faultCode, faultCode);
  assert.equal(error.rawCode, rawCode);
  assert.equal(error.reason, faultCode.replace("FAULT_CODE_", ""));
  assert.equal(error.domain, "autostore.task");
  assert.equal(error.retryDelayMs, null);
}

for (const fault of SIMULATOR_FAULTS) {
  test(`port ${fault[0]} gives ${fault[2]}`, async () => {
    checkFault(await expectError(client.caseExtract(fault[0], 101337)), fault);
  });
  test(`gRPC-Web: port ${fault[0]} gives ${fault[2]}`, async () => {
    const baseUrl = `http://${gateway.address}`;
    checkFault(await expectError(caseExtractGrpcWeb(baseUrl, fault[0], 101337)), fault);
  });
}

test("invalid arguments carry the field violations", async () => {
  const error = await expectError(client.caseExtract(0, 4000001));
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.equal(error.reason, "INVALID_PARAMETER");
  assert.equal(error.rawCode, null);
  assert.deepEqual(
    error.fieldViolations.map((violation) => violation.field),
    ["port_id", "bin_id"],
  );
});

test("gRPC-Web: the message and field violations arrive too", async () => {
  const baseUrl = `http://${gateway.address}`;
  const error = await expectError(caseExtractGrpcWeb(baseUrl, 2, 101337));
  assert.match(error.message, /controller fault 1099 PORT_NOT_IN_APPROPRIATE_MODE/);

  const invalid = await expectError(caseExtractGrpcWeb(baseUrl, 0, 1));
  assert.equal(invalid.codeName, "INVALID_ARGUMENT");
  assert.equal(invalid.fieldViolations[0].field, "port_id");
});

test("cancel leaves NOOP with the bin", async () => {
  // Port 4 may still run the extraction of an earlier test (each step lasts 2 s): either way an
  // extraction on bin 101337 runs when the cancel arrives.
  await client.caseExtract(4, 101337, { maxAttempts: 1 }).catch((error) => assert.equal(error.rawCode, 1148));
  assert.equal((await client.caseCancel(4, 101337, { requestId: "node-cancel" })).requestId, "node-cancel");
  assert.deepEqual(await client.caseGetState(4), {
    port_id: 4,
    bin_id: 101337,
    state: "CASE_STATE_NO_OPERATION",
    raw_state: "NOOP",
  });
  const error = await expectError(client.caseCancel(4, 101337));
  assert.equal(error.faultCode, "FAULT_CODE_BIN_NOT_SELECTED_FOR_PORT");
  assert.deepEqual(error.metadata, { faultCode: "1149", method: "case_cancel", portId: "4", binId: "101337" });
});

test("case state of a port, and of one that is not an AutoCase port", async () => {
  // Port 2 is a CLOSED AutoCase port: reading its state changes nothing, so it answers.
  assert.deepEqual(await client.caseGetState(2), {
    port_id: 2,
    bin_id: null,
    state: "CASE_STATE_NO_OPERATION",
    raw_state: "NOOP",
  });
  const error = await expectError(client.caseGetState(1));
  assert.equal(error.codeName, "FAILED_PRECONDITION");
  assert.equal(error.faultCode, "FAULT_CODE_PORT_IS_NOT_AUTOCASE");
  assert.deepEqual(error.metadata, { faultCode: "1087", method: "case_getstate", portId: "1" });
});

test("gRPC-Web: 1148 carries its retry delay", async () => {
  const baseUrl = `http://${gateway.address}`;
  // Port 4 is busy from the first test (its case step lasts 2 s) or becomes busy here.
  await caseExtractGrpcWeb(baseUrl, 4, 101337).catch(() => {});
  const error = await expectError(caseExtractGrpcWeb(baseUrl, 4, 101337));
  assert.equal(error.rawCode, 1148);
  assert.equal(error.retryDelayMs, 1500);
});

test("gRPC-Web frames are read whole however the body's chunks split them", async () => {
  const frame = (flags, text) => {
    const payload = Buffer.from(text);
    const bytes = Buffer.alloc(5 + payload.length);
    bytes.writeUInt8(flags, 0);
    bytes.writeUInt32BE(payload.length, 1);
    payload.copy(bytes, 5);
    return bytes;
  };
  const body = Buffer.concat([frame(0, "first"), frame(0, ""), frame(0, "x".repeat(300)), frame(0x80, "grpc-status: 0\r\n")]);
  const expected = [
    [0, "first"],
    [0, ""],
    [0, "x".repeat(300)],
    [0x80, "grpc-status: 0\r\n"],
  ];
  async function* chunked(size) {
    for (let offset = 0; offset < body.length; offset += size) yield new Uint8Array(body.subarray(offset, offset + size));
  }
  for (const size of [1, 2, 3, 4, 5, 6, 7, 64, body.length]) {
    const frames = [];
    for await (const { flags, payload } of grpcWebFrames(chunked(size))) frames.push([flags, payload.toString()]);
    assert.deepEqual(frames, expected, `chunks of ${size} bytes`);
  }
  async function* truncated() {
    yield body.subarray(0, 7);
  }
  await assert.rejects(async () => {
    for await (const _ of grpcWebFrames(truncated()));
  }, /ended inside a frame/);
});

describe("WatchCaseEvents", () => {
  // The longest a watch is retried while the gateway's Log Publisher feed connects after start,
  // and the deadline of every stream a test reads: an event that never comes ends the stream (and
  // fails the test) within it.
  const FEED_LIMIT_MS = 10_000;
  const STREAM_LIMIT_MS = 10_000;
  const EXTRACTION = [
    ["CASE_STATE_EXTRACTION_REQUESTED", "EREQ"],
    ["CASE_STATE_EXTRACTION_READY_TO_SEND", "ERSO"],
    ["CASE_STATE_EXTRACTION_COMPLETED", "ECMP"],
  ];
  let layouts;
  let fast;
  let slow;
  let withoutPublisher;

  // Port 4 of the default layout alone, each extraction state (EREQ, ERSO) lasting `stepTime`.
  function layout(stepTime) {
    const file = path.join(layouts, `step-${stepTime}.toml`);
    fs.writeFileSync(
      file,
      `step_time = "${stepTime}"\n[[port]]\nid = 4\nautocase = true\nmode = "OPEN"\nselected_bin = 101337\n`,
    );
    return file;
  }

  before(async () => {
    layouts = fs.mkdtempSync(path.join(os.tmpdir(), "taskgate-layout-"));
    // An extraction through EREQ, ERSO and ECMP in 100 ms; one that stays requested for an hour,
    // for a cancel to find it running; and a gateway without case events.
    [fast, slow, withoutPublisher] = await Promise.all([
      startGateway(["--simulator-config", layout("50ms")]),
      startGateway(["--simulator-config", layout("1h")]),
      startGateway(["--log-publisher", "off"]),
    ]);
    for (const gateway of [fast, slow, withoutPublisher]) {
      gateway.client = new TaskGate(gateway.address);
      gateway.baseUrl = `http://${gateway.address}`;
    }
  });

  after(async () => {
    for (const gateway of [fast, slow, withoutPublisher]) {
      gateway.client.close();
      assert.equal(await gateway.stop(), 0);
    }
    fs.rmSync(layouts, { recursive: true, force: true });
  });

  // Opens a watch with `open` once the gateway's feed is connected: just after the gateway
  // starts, a watch is refused with UNAVAILABLE (LOG_PUBLISHER_UNAVAILABLE) until then, which is
  // retried for at most FEED_LIMIT_MS.
  async function openWatch(open) {
    const giveUp = Date.now() + FEED_LIMIT_MS;
    for (;;) {
      try {
        return await open();
      } catch (error) {
        if (!(error instanceof TaskGateError) || error.reason !== "LOG_PUBLISHER_UNAVAILABLE" || Date.now() > giveUp) {
          throw error;
        }
      }
    }
  }

  // The option that sets a watch's x-request-id over `transport`.
  const requestId = (transport, id) => (transport === "gRPC" ? { requestId: id } : { headers: { "x-request-id": id } });

  const transports = {
    gRPC: (gateway, portIds, options) => gateway.client.watchCaseEvents(portIds, options),
    "gRPC-Web": (gateway, portIds, options) => watchCaseEventsGrpcWeb(gateway.baseUrl, portIds, options),
  };

  for (const [transport, watch] of Object.entries(transports)) {
    test(`${transport}: an extraction is watched as EREQ, ERSO, ECMP`, async () => {
      const before = Date.now();
      const events = await openWatch(() => watch(fast, [4], { timeoutMs: STREAM_LIMIT_MS }));
      assert.ok(events.requestId);
      await fast.client.caseExtract(4, 101337);
      const seen = [];
      for await (const event of events) {
        seen.push(event);
        if (seen.length === EXTRACTION.length) break;
      }
      assert.deepEqual(
        seen.map(({ received_at: _, ...event }) => event),
        EXTRACTION.map(([state, code]) => ({
          port_id: 4,
          bin_id: 101337,
          state,
          cancel_request: false,
          raw_state: code,
          segment: `AC,4,101337,${code}`,
        })),
      );
      // Each arrived as it happened, long before the stream's deadline.
      const received = seen.map((event) => event.received_at.getTime());
      assert.ok(before - 1000 <= received[0] && received[0] <= received[1] && received[1] <= received[2], String(received));
      assert.ok(Date.now() - before < STREAM_LIMIT_MS / 2);
      assert.equal((await fast.client.caseGetState(4)).raw_state, "ECMP");
    });

    test(`${transport}: a deadline ends the stream with DEADLINE_REACHED`, async () => {
      const events = await openWatch(() => watch(fast, [4], { timeoutMs: 1000 }));
      const error = await expectError(
        (async () => {
          for await (const _ of events);
        })(),
      );
      // The gateway's own status with its details, not the client's bare timeout.
      assert.equal(error.codeName, "DEADLINE_EXCEEDED");
      assert.equal(error.reason, "DEADLINE_REACHED");
      assert.equal(error.domain, "taskgate");
      assert.deepEqual(error.metadata, { method: "WatchCaseEvents" });
    });

    test(`${transport}: a gateway without Log Publisher refuses watches with LOG_PUBLISHER_DISABLED`, async () => {
      const error = await expectError(watch(withoutPublisher, [4], { timeoutMs: STREAM_LIMIT_MS }));
      assert.equal(error.codeName, "FAILED_PRECONDITION");
      assert.equal(error.reason, "LOG_PUBLISHER_DISABLED");
      assert.equal(error.domain, "taskgate");
      assert.deepEqual(error.metadata, { method: "WatchCaseEvents" });
      assert.match(error.message, /--log-publisher off/);
    });

    test(`${transport}: ports out of range are refused`, async () => {
      const error = await expectError(watch(fast, [4, 0, 2001], { timeoutMs: STREAM_LIMIT_MS }));
      assert.equal(error.codeName, "INVALID_ARGUMENT");
      assert.equal(error.reason, "INVALID_PARAMETER");
      assert.deepEqual(
        error.fieldViolations.map((violation) => violation.field),
        ["port_ids", "port_ids"],
      );
    });

    test(`${transport}: a watch's error carries its request id`, async () => {
      // Refused: the gateway's one answer is trailers-only.
      const refused = await expectError(watch(fast, [0], { timeoutMs: STREAM_LIMIT_MS, ...requestId(transport, "node-watch-refused") }));
      assert.equal(refused.requestId, "node-watch-refused");
      // Ended after it started: the id came with the headers, the status with the trailers.
      const events = await openWatch(() => watch(fast, [4], { timeoutMs: 1000, ...requestId(transport, "node-watch-ended") }));
      const ended = await expectError(
        (async () => {
          for await (const _ of events);
        })(),
      );
      assert.deepEqual([ended.reason, ended.requestId], ["DEADLINE_REACHED", "node-watch-ended"]);
    });

    test(`${transport}: cancelling a watch ends its iteration`, async () => {
      const events = await openWatch(() => watch(fast, [4], { timeoutMs: STREAM_LIMIT_MS }));
      events.cancel();
      assert.equal(await events.nextEvent(), null);
    });
  }

  test("gRPC: a cancel is watched as CR, then NOOP", async () => {
    const events = await openWatch(() => slow.client.watchCaseEvents([], { timeoutMs: STREAM_LIMIT_MS }));
    try {
      await slow.client.caseExtract(4, 101337);
      assert.equal((await events.nextEvent()).raw_state, "EREQ");
      await slow.client.caseCancel(4, 101337);
      const { received_at: _cr, ...cancel } = await events.nextEvent();
      const { received_at: _noop, ...noop } = await events.nextEvent();
      // CR is a signal, not a state.
      assert.deepEqual(cancel, {
        port_id: 4,
        bin_id: 101337,
        state: null,
        cancel_request: true,
        raw_state: "CR",
        segment: "AC,4,101337,CR",
      });
      assert.deepEqual(noop, {
        port_id: 4,
        bin_id: 101337,
        state: "CASE_STATE_NO_OPERATION",
        cancel_request: false,
        raw_state: "NOOP",
        segment: "AC,4,101337,NOOP",
      });
    } finally {
      events.cancel();
    }
    assert.equal((await slow.client.caseGetState(4)).raw_state, "NOOP");
  });

  test("gRPC-Web: the stream's status arrives in a trailer frame after its messages", async () => {
    // The feed is connected once a watch opens.
    (await openWatch(() => fast.client.watchCaseEvents([4], { timeoutMs: STREAM_LIMIT_MS }))).cancel();
    const request = Buffer.from([0, 0, 0, 0, 2, 0x08, 4]); // one frame: WatchCaseEventsRequest{port_ids: [4]}
    const response = await fetch(`${fast.baseUrl}/taskgate.v1.TaskService/WatchCaseEvents`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", "grpc-timeout": "2000m" },
      body: request,
    });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("grpc-status"), null, "a trailers-only reply");
    await fast.client.caseExtract(4, 101337);
    const frames = [];
    for await (const frame of grpcWebFrames(response.body)) frames.push(frame);
    assert.deepEqual(
      frames.map(({ flags }) => flags),
      [0, 0, 0, 0x80],
    );
    const trailers = new Map();
    for (const line of frames[3].payload.toString().split("\r\n")) {
      const colon = line.indexOf(":");
      if (colon > 0) trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    assert.equal(trailers.get("grpc-status"), "4");
    const error = errorFromStatusDetails(4, "", Buffer.from(trailers.get("grpc-status-details-bin"), "base64"));
    assert.equal(error.reason, "DEADLINE_REACHED");
    assert.equal(error.domain, "taskgate");
    assert.deepEqual(error.metadata, { method: "WatchCaseEvents" });
  });
});

// Safe retries (README, "Retry contract" and "Idempotency"): every CaseExtract and CaseCancel call
// sends a fresh idempotency key and keeps it across its retries; only UNAVAILABLE (and OVERLOADED)
// is retried; an error says whether the controller may have acted.
describe("safe retries", () => {
  const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
  let layouts;
  let own;

  before(async () => {
    layouts = fs.mkdtempSync(path.join(os.tmpdir(), "taskgate-layout-"));
    // A gateway of its own, whose simulator runs an extraction in 100 ms: no other test moves its
    // port 4.
    const layout = path.join(layouts, "step-50ms.toml");
    fs.writeFileSync(
      layout,
      'step_time = "50ms"\n[[port]]\nid = 4\nautocase = true\nmode = "OPEN"\nselected_bin = 101337\n',
    );
    own = await startGateway(["--simulator-config", layout]);
    own.client = new TaskGate(own.address);
  });

  after(async () => {
    own.client.close();
    assert.equal(await own.stop(), 0);
    fs.rmSync(layouts, { recursive: true, force: true });
  });

  // A controller's task interface that answers the n-th POST as `script[n]` says (the last entry
  // for the rest): "503" (HTTP 503: it declined the request) or "drop" (read it, then close the
  // connection: it may have been acted on). Connections that send nothing (health probes) are
  // not POSTs. Runs `body({ client, gateway, posts() })` against a gateway in front of it, with a
  // RetryInfo delay of 100 ms.
  async function withFakeController(script, body) {
    let posts = 0;
    const server = net.createServer((socket) => {
      let received = Buffer.alloc(0);
      socket.on("error", () => {});
      socket.on("data", (chunk) => {
        received = Buffer.concat([received, chunk]);
        const headEnd = received.indexOf("\r\n\r\n");
        if (headEnd < 0) return;
        const length = /\r\ncontent-length:\s*(\d+)/i.exec(received.subarray(0, headEnd).toString("latin1"));
        if (received.length - headEnd - 4 < Number(length ? length[1] : 0)) return;
        const action = script[Math.min(posts, script.length - 1)];
        posts += 1;
        received = Buffer.alloc(0);
        if (action === "503") {
          socket.end("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        } else {
          socket.destroy();
        }
      });
    });
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    const url = `http://127.0.0.1:${server.address().port}/api/v2/task`;
    const gateway = await startGateway([], { upstream: ["--upstream", url, "--log-publisher", "off"], retryDelay: "100ms" });
    const client = new TaskGate(gateway.address);
    try {
      await body({ client, gateway, posts: () => posts });
    } finally {
      client.close();
      assert.equal(await gateway.stop(), 0);
      server.close();
    }
  }

  // Resolves with the access lines of `count` calls the gateway received with idempotency key
  // `key` (each line is written once its call has ended, maybe after the client saw the end).
  function attemptsLogged(gateway, key, count) {
    return gateway.linesLogged((line) => line.includes("taskgate::access") && line.includes(`idempotency_key=${key} `), count);
  }

  test("each call sends a fresh UUID v4 key, and a repeat with it is replayed", async () => {
    const first = await own.client.caseExtract(4, 101337);
    assert.match(first.idempotencyKey, UUID_V4);
    assert.equal(first.replayed, null);
    const repeat = await own.client.caseExtract(4, 101337, { idempotencyKey: first.idempotencyKey });
    assert.deepEqual(
      [repeat.idempotencyKey, repeat.replayed, repeat.attempts],
      [first.idempotencyKey, "stored", 1],
    );
    // A new logical call gets a new key: it is not answered from the first one's.
    const second = await own.client.caseExtract(4, 101337);
    assert.notEqual(second.idempotencyKey, first.idempotencyKey);
    assert.equal(second.replayed, null);
  });

  test("UNAVAILABLE is retried with the same key up to maxAttempts", async () => {
    await withFakeController(["503"], async ({ client, gateway, posts }) => {
      const error = await expectError(client.caseExtract(4, 101337, { timeoutMs: 30000, maxAttempts: 3 }));
      assert.deepEqual([error.codeName, error.reason, error.metadata.httpStatus], ["UNAVAILABLE", "UPSTREAM_HTTP_ERROR", "503"]);
      assert.deepEqual([error.retryable, error.mayHaveActed, error.attempts], [true, false, 3]);
      assert.equal(posts(), 3);
      assert.equal((await attemptsLogged(gateway, error.idempotencyKey, 3)).length, 3);
    });
  });

  test("a retried call's error carries the request id of its last attempt", async () => {
    await withFakeController(["503"], async ({ client, gateway }) => {
      const error = await expectError(client.caseExtract(4, 101337, { timeoutMs: 30000, maxAttempts: 3 }));
      // An error's access line is written before its answer is sent, so the lines come in the
      // order of the attempts; the gateway gave each attempt an id of its own.
      const logged = (await attemptsLogged(gateway, error.idempotencyKey, 3)).map((line) => / request_id=(\S+)/.exec(line)[1]);
      assert.equal(new Set(logged).size, 3);
      assert.equal(error.requestId, logged[2]);
    });
  });

  test("an unknown outcome is not retried, and carries the key to repeat the call with", async () => {
    await withFakeController(["503", "drop"], async ({ client, gateway, posts }) => {
      const error = await expectError(client.caseExtract(4, 101337, { timeoutMs: 30000 }));
      assert.deepEqual([error.codeName, error.reason], ["UNKNOWN", "UPSTREAM_CONNECTION_LOST"]);
      assert.deepEqual([error.retryable, error.mayHaveActed, error.attempts], [false, true, 2]);
      assert.equal(posts(), 2);
      assert.match(error.idempotencyKey, UUID_V4);
      assert.equal((await attemptsLogged(gateway, error.idempotencyKey, 2)).length, 2);
    });
  });

  const CLASSIFICATION = [
    ["UNAVAILABLE", "PREVIOUS_ACTION_NOT_COMPLETED", true, false],
    ["UNAVAILABLE", "UPSTREAM_UNREACHABLE", true, false],
    ["UNAVAILABLE", "UPSTREAM_HTTP_ERROR", true, false],
    // The connection to the gateway broke: the call may have reached it.
    ["UNAVAILABLE", "", true, true],
    ["UNKNOWN", "UPSTREAM_CONNECTION_LOST", false, true],
    ["UNKNOWN", "UPSTREAM_HTTP_ERROR", false, true],
    ["UNKNOWN", "UNKNOWN_FAULT", false, true],
    ["DEADLINE_EXCEEDED", "UPSTREAM_TIMEOUT", false, true],
    ["DEADLINE_EXCEEDED", "REQUEST_IN_PROGRESS", false, true],
    ["DEADLINE_EXCEEDED", "", false, true],
    ["DEADLINE_EXCEEDED", "DEADLINE_TOO_SHORT", false, false],
    ["INTERNAL", "UPSTREAM_BAD_RESPONSE", false, true],
    ["INTERNAL", "CONTROLLER_INTERNAL_ERROR", false, true],
    ["FAILED_PRECONDITION", "REQUEST_OUTCOME_UNKNOWN", false, true],
    ["FAILED_PRECONDITION", "BIN_NOT_SELECTED_FOR_PORT", false, false],
    ["INVALID_ARGUMENT", "REQUEST_ID_REUSED", false, false],
    ["NOT_FOUND", "PORT_IS_NOT_AVAILABLE", false, false],
    ["UNAUTHENTICATED", "UNAUTHENTICATED", false, false],
    ["RESOURCE_EXHAUSTED", "OVERLOADED", true, false],
    ["RESOURCE_EXHAUSTED", "WATCH_LAGGED", false, false],
    ["CANCELLED", "", false, true],
  ];
  const REPEAT_SETTLES = [
    // The process that held the key has exited: a repeat would be a new call.
    ["UNKNOWN", "SHUTDOWN_GRACE_RAN_OUT", {}, false, false],
    ["UNKNOWN", "SHUTDOWN_GRACE_RAN_OUT", { requestOutcome: "unknown" }, false, false],
    ["UNKNOWN", "SHUTDOWN_GRACE_RAN_OUT", { requestOutcome: "unknown" }, true, false],
    // A repeat already read the port and could not tell.
    ["FAILED_PRECONDITION", "REQUEST_OUTCOME_UNKNOWN", {}, false, false],
    // A status the task interface never answers: a repeat reads the port through the same URL.
    ["INTERNAL", "UPSTREAM_HTTP_ERROR", {}, false, false],
    ["UNKNOWN", "UPSTREAM_HTTP_ERROR", {}, false, true],
    ["DEADLINE_EXCEEDED", "UPSTREAM_TIMEOUT", {}, false, true],
    ["DEADLINE_EXCEEDED", "UPSTREAM_TIMEOUT", {}, true, true],
    ["UNKNOWN", "UPSTREAM_CONNECTION_LOST", {}, false, true],
    // The connection to the gateway broke: the gateway that got the call holds its key.
    ["UNAVAILABLE", "", {}, false, true],
    // Refused: the controller did not act, so there is nothing to settle.
    ["RESOURCE_EXHAUSTED", "OVERLOADED", {}, false, false],
    ["NOT_FOUND", "PORT_IS_NOT_AVAILABLE", {}, false, false],
    // A repeat's failed port read: the gateway holds the key's unknown outcome.
    ["UNAVAILABLE", "UPSTREAM_UNREACHABLE", { requestOutcome: "unknown" }, true, true],
    // An unmarked definite answer to a repeat: the gateway took the key as new (forgotten,
    // evicted, restarted, another replica) or has an answer stored, so a further repeat settles
    // nothing; after 1148 it would start a second extraction.
    ["UNAVAILABLE", "PREVIOUS_ACTION_NOT_COMPLETED", {}, true, false],
    ["FAILED_PRECONDITION", "BIN_NOT_SELECTED_FOR_PORT", {}, true, false],
    ["INVALID_ARGUMENT", "REQUEST_ID_REUSED", {}, true, false],
  ];
  for (const [codeName, reason, metadata, repeat, repeatSettles] of REPEAT_SETTLES) {
    const marked = metadata.requestOutcome ? ", marked requestOutcome unknown" : "";
    const call = repeat ? "a repeat's" : "a call's";
    test(`${call} ${codeName} ${reason || "without a reason"}${marked}: a repeat with the key settles it: ${repeatSettles}`, () => {
      // A repeat is a call given its key, which counts as one after an attempt that may have acted.
      const error = new TaskGateError({ code: grpc.status[codeName], codeName, message: "", reason, metadata });
      error.idempotencyKey = repeat ? "key" : null;
      error.earlierAttemptMayHaveActed = repeat;
      assert.equal(error.repeatSettles, repeatSettles);
    });
  }

  test("a failed port read after an unknown outcome may have acted, whatever its code", () => {
    const error = new TaskGateError({
      code: grpc.status.UNAVAILABLE,
      codeName: "UNAVAILABLE",
      message: "",
      reason: "UPSTREAM_UNREACHABLE",
      metadata: { requestOutcome: "unknown" },
    });
    assert.deepEqual([error.retryable, error.mayHaveActed], [true, true]);
  });

  test("may have acted is kept across the client's own retries of one call", async () => {
    // The first attempt was cut off (it may have reached the controller); the retry was answered
    // "unreachable": the call may still have acted.
    const failures = [
      ["UNAVAILABLE", ""],
      ["UNAVAILABLE", "UPSTREAM_UNREACHABLE"],
    ].map(([codeName, reason]) => new TaskGateError({ code: grpc.status[codeName], codeName, message: "", reason, metadata: {} }));
    const stub = Object.create(TaskGate.prototype);
    stub.attempt = async () => {
      throw failures.shift();
    };
    const request = { port_id: 4, bin_id: 101337, request_id: "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b" };
    const error = await stub.call("CaseExtract", request, { timeoutMs: 30000, maxAttempts: 2 }).then(
      () => assert.fail("the call succeeded"),
      (failed) => failed,
    );
    assert.deepEqual([error.reason, error.attempts, error.mayHaveActed], ["UPSTREAM_UNREACHABLE", 2, true]);
  });

  test("after an attempt that may have acted, only a port read is retried", async () => {
    // The first attempt was cut off after it may have reached the controller. A gateway that
    // forgot the key (restarted, another replica) sends the retry as a new call, and its 1148
    // then most likely means the first attempt's extraction is running: retrying until it ends
    // would start a second one.
    const failure = ([codeName, reason, metadata = {}]) =>
      new TaskGateError({ code: grpc.status[codeName], codeName, message: "", reason, metadata, retryDelayMs: 1 });
    const run = async (method, request, failures) => {
      const stub = Object.create(TaskGate.prototype);
      stub.attempt = async () => {
        throw failure(failures.shift());
      };
      return stub.call(method, request, { timeoutMs: 30000, maxAttempts: 3 }).then(
        () => assert.fail("the call succeeded"),
        (failed) => failed,
      );
    };
    const request = { port_id: 4, bin_id: 101337, request_id: "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b" };
    const cutOff = ["UNAVAILABLE", ""];
    const busy = ["UNAVAILABLE", "PREVIOUS_ACTION_NOT_COMPLETED"];
    const error = await run("CaseExtract", request, [cutOff, busy, cutOff]);
    assert.deepEqual(
      [error.reason, error.attempts, error.mayHaveActed, error.retryable],
      ["PREVIOUS_ACTION_NOT_COMPLETED", 2, true, false],
    );
    // A gateway that remembers the key as unknown reads the port before sending again, and says
    // so: that answer is retried. So is any answer to a read, which never acts.
    const marked = ["UNAVAILABLE", "UPSTREAM_UNREACHABLE", { requestOutcome: "unknown" }];
    const last = ["UNKNOWN", "LAST"];
    const afterMarked = await run("CaseExtract", request, [cutOff, marked, last]);
    assert.deepEqual([afterMarked.reason, afterMarked.attempts], ["LAST", 3]);
    const read = await run("CaseGetState", { port_id: 4 }, [cutOff, busy, last]);
    assert.deepEqual([read.reason, read.attempts], ["LAST", 3]);
  });

  for (const method of ["caseExtract", "caseCancel"]) {
    test(`${method}: a repeat with the caller's key does not retry into a second operation`, async () => {
      // The caller repeats, with its key, a call that may have acted. A gateway that forgot the
      // key (restarted, another replica) sends the repeat as a new call, and its 1148 (without the
      // requestOutcome marker) most likely means the first call's operation is running: retrying
      // until it ends would start a second one.
      const keys = [];
      const stub = Object.create(TaskGate.prototype);
      stub.attempt = async (_, request) => {
        keys.push(request.request_id);
        throw new TaskGateError({
          code: grpc.status.UNAVAILABLE,
          codeName: "UNAVAILABLE",
          message: "",
          reason: "PREVIOUS_ACTION_NOT_COMPLETED",
          metadata: { faultCode: "1148" },
          retryDelayMs: 1,
        });
      };
      const failed = (options) =>
        stub[method](4, 101337, { timeoutMs: 30000, maxAttempts: 3, ...options }).then(
          () => assert.fail("the call succeeded"),
          (error) => error,
        );
      const key = "9f1c2b3a-4d5e-4f60-8a7b-1c2d3e4f5a6b";
      const repeat = await failed({ idempotencyKey: key });
      assert.deepEqual(
        [repeat.reason, repeat.idempotencyKey, repeat.attempts, repeat.mayHaveActed, repeat.retryable],
        ["PREVIOUS_ACTION_NOT_COMPLETED", key, 1, true, false],
      );
      // A new call (a fresh key) meets another operation's 1148: it is retried.
      const fresh = await failed({});
      assert.deepEqual([fresh.attempts, fresh.mayHaveActed, fresh.retryable], [3, false, true]);
      assert.deepEqual(keys, [key, ...Array(3).fill(fresh.idempotencyKey)]);
    });
  }

  test("CaseExtract and CaseCancel send the key also as idempotency-key metadata, for a proxy to hash on", async () => {
    // A stand-in TaskService that records what each call carried: the gateway reads only the
    // field, so only a server that looks at the metadata can tell it was sent.
    const definition = protoLoader.loadSync("taskgate/v1/task.proto", {
      includeDirs: [path.resolve(__dirname, "..", "..", "..", "proto")],
      keepCase: true,
    });
    const { TaskService } = grpc.loadPackageDefinition(definition).taskgate.v1;
    const seen = [];
    const record = (call, callback) => {
      seen.push([call.request.request_id, call.metadata.get("idempotency-key")]);
      callback(null, {});
    };
    const server = new grpc.Server();
    server.addService(TaskService.service, { CaseExtract: record, CaseCancel: record });
    const port = await new Promise((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    const stub = new TaskGate(`127.0.0.1:${port}`);
    try {
      const extracted = await stub.caseExtract(4, 101337);
      const cancelled = await stub.caseCancel(4, 101337, { idempotencyKey: extracted.idempotencyKey });
      assert.deepEqual(seen, [
        [extracted.idempotencyKey, [extracted.idempotencyKey]],
        [cancelled.idempotencyKey, [cancelled.idempotencyKey]],
      ]);
    } finally {
      stub.close();
      server.forceShutdown();
    }
  });

  for (const [codeName, reason, retryable, mayHaveActed] of CLASSIFICATION) {
    test(`${codeName} ${reason || "without a reason"}: retryable ${retryable}, may have acted ${mayHaveActed}`, () => {
      const error = new TaskGateError({ code: grpc.status[codeName], codeName, message: "", reason });
      assert.deepEqual([error.retryable, error.mayHaveActed], [retryable, mayHaveActed]);
    });
  }
});
