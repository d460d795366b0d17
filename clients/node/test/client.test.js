"use strict";
// The Node client against the real gateway: gRPC and gRPC-Web, success and every typed fault,
// cancel and case state.

const { test, before, after } = require("node:test");
const assert = require("node:assert/strict");
const { TaskGate, TaskGateError, caseExtractGrpcWeb } = require("../client.js");
const { startGateway } = require("./gateway.js");

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
  assert.equal(await client.caseExtract(4, 101337, { requestId: "node-1" }), "node-1");
  const error = await expectError(client.caseExtract(4, 101337));
  assert.equal(error.codeName, "UNAVAILABLE");
  assert.equal(error.faultCode, "FAULT_CODE_PREVIOUS_ACTION_NOT_COMPLETED");
  assert.equal(error.rawCode, 1148);
  assert.equal(error.retryDelayMs, 1500);
  assert.equal(error.domain, "autostore.task");
  assert.deepEqual(error.metadata, { faultCode: "1148", method: "case_extract", portId: "4", binId: "101337" });
});

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
  await client.caseExtract(4, 101337).catch((error) => assert.equal(error.rawCode, 1148));
  assert.equal(await client.caseCancel(4, 101337, { requestId: "node-cancel" }), "node-cancel");
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
