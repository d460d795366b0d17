"use strict";
// A small Node.js client for taskgate's TaskService, loading proto/ at run time (nothing is
// generated or committed), with the rich error details decoded into a TaskGateError.

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
const TASK_PROTO = "taskgate/v1/task.proto";

const packageDefinition = protoLoader.loadSync(TASK_PROTO, {
  includeDirs: [PROTO_ROOT],
  keepCase: true,
  enums: String,
  longs: Number,
  defaults: true,
});
const { TaskService } = grpc.loadPackageDefinition(packageDefinition).taskgate.v1;

// The contract's own types, for TaskFault and FaultCode.
const taskRoot = new protobuf.Root();
taskRoot.resolvePath = (_origin, target) => path.join(PROTO_ROOT, target);
taskRoot.loadSync(TASK_PROTO, { keepCase: true });
const TaskFault = taskRoot.lookupType("taskgate.v1.TaskFault");
const CaseExtractRequest = taskRoot.lookupType("taskgate.v1.CaseExtractRequest");
const FaultCode = taskRoot.lookupEnum("taskgate.v1.FaultCode").values;

// The standard google.rpc types the gateway puts in grpc-status-details-bin, by field number.
const rpcRoot = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } },
            Duration: { fields: { seconds: { type: "int64", id: 1 }, nanos: { type: "int32", id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: "string", id: 1 },
                domain: { type: "string", id: 2 },
                metadata: { keyType: "string", type: "string", id: 3 },
              },
            },
            RetryInfo: { fields: { retry_delay: { type: "google.protobuf.Duration", id: 1 } } },
            BadRequest: {
              fields: { field_violations: { rule: "repeated", type: "FieldViolation", id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: "string", id: 1 }, description: { type: "string", id: 2 } },
                },
              },
            },
          },
        },
      },
    },
  },
});
const RpcStatus = rpcRoot.lookupType("google.rpc.Status");
const ErrorInfo = rpcRoot.lookupType("google.rpc.ErrorInfo");
const RetryInfo = rpcRoot.lookupType("google.rpc.RetryInfo");
const BadRequest = rpcRoot.lookupType("google.rpc.BadRequest");

/** A failed call, with everything the status details say. */
class TaskGateError extends Error {
  constructor(fields) {
    super(`${fields.codeName}: ${fields.message}`);
    this.name = "TaskGateError";
    /** The numeric gRPC status code. */
    this.code = fields.code;
    /** The gRPC status code's name, for example UNAVAILABLE. */
    this.codeName = fields.codeName;
    /** ErrorInfo reason: the fault name or a gateway reason. */
    this.reason = fields.reason;
    /** ErrorInfo domain: autostore.task or taskgate. */
    this.domain = fields.domain;
    /** ErrorInfo metadata. */
    this.metadata = fields.metadata;
    /** The FaultCode enum name, FAULT_CODE_UNSPECIFIED when unknown or not a fault. */
    this.faultCode = fields.faultCode;
    /** The controller's fault number, or null. */
    this.rawCode = fields.rawCode;
    /** From RetryInfo, in milliseconds, or null when a retry is not known to be safe. */
    this.retryDelayMs = fields.retryDelayMs;
    /** From BadRequest: [{ field, description }]. */
    this.fieldViolations = fields.fieldViolations;
  }
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** Decodes a google.rpc.Status (the grpc-status-details-bin bytes) into a TaskGateError. */
function errorFromStatusDetails(code, message, detailsBytes) {
  const fields = {
    code,
    codeName: CODE_NAMES[code] || String(code),
    message,
    reason: "",
    domain: "",
    metadata: {},
    faultCode: "FAULT_CODE_UNSPECIFIED",
    rawCode: null,
    retryDelayMs: null,
    fieldViolations: [],
  };
  if (detailsBytes && detailsBytes.length > 0) {
    const status = RpcStatus.decode(detailsBytes);
    for (const any of status.details) {
      const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
      if (typeName === "google.rpc.ErrorInfo") {
        const info = ErrorInfo.toObject(ErrorInfo.decode(any.value), { defaults: true });
        fields.reason = info.reason;
        fields.domain = info.domain;
        fields.metadata = info.metadata || {};
      } else if (typeName === "taskgate.v1.TaskFault") {
        const fault = TaskFault.toObject(TaskFault.decode(any.value), { enums: String, defaults: true });
        fields.faultCode = fault.code;
        fields.rawCode = fault.raw_code;
      } else if (typeName === "google.rpc.RetryInfo") {
        const delay = RetryInfo.decode(any.value).retry_delay;
        if (delay) fields.retryDelayMs = Number(delay.seconds) * 1000 + Math.round((delay.nanos || 0) / 1e6);
      } else if (typeName === "google.rpc.BadRequest") {
        fields.fieldViolations = BadRequest.decode(any.value).field_violations.map((violation) => ({
          field: violation.field,
          description: violation.description,
        }));
      }
    }
  }
  return new TaskGateError(fields);
}

/** A connection to a taskgate gateway over gRPC (HTTP/2). */
class TaskGate {
  /** `target` is host:port; `token` a bearer token when the gateway requires one. */
  constructor(target, { token, credentials } = {}) {
    this.client = new TaskService(target, credentials || grpc.credentials.createInsecure());
    this.token = token;
  }

  /**
   * Extracts a case from `binId` at `portId`; resolves with the call's request id and rejects
   * with a TaskGateError.
   */
  async caseExtract(portId, binId, options = {}) {
    const { requestId } = await this.call("CaseExtract", { port_id: portId, bin_id: binId }, options);
    return requestId;
  }

  /**
   * Cancels the case operation running on `binId` at `portId`; resolves with the call's request
   * id and rejects with a TaskGateError (fault 1149 when nothing runs on that bin at the port).
   */
  async caseCancel(portId, binId, options = {}) {
    const { requestId } = await this.call("CaseCancel", { port_id: portId, bin_id: binId }, options);
    return requestId;
  }

  /**
   * Reads the port's AutoCase state; resolves with { port_id, bin_id (null when the controller
   * names none), state (the CaseState name), raw_state (the vendor code, e.g. "ERSO") } and
   * rejects with a TaskGateError.
   */
  async caseGetState(portId, options = {}) {
    const { response } = await this.call("CaseGetState", { port_id: portId }, options);
    // proto-loader leaves an unset proto3 `optional` field out, or null with `defaults`.
    return { ...response, bin_id: response.bin_id ?? null };
  }

  /** Calls `method` with the token and request id; resolves with { response, requestId }. */
  call(method, request, { timeoutMs = 10000, requestId } = {}) {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    if (requestId) metadata.set("x-request-id", requestId);
    return new Promise((resolve, reject) => {
      let returnedId = "";
      const call = this.client[method](request, metadata, { deadline: Date.now() + timeoutMs }, (error, response) => {
        if (!error) return resolve({ response, requestId: returnedId });
        const details = error.metadata ? error.metadata.get("grpc-status-details-bin")[0] : undefined;
        return reject(errorFromStatusDetails(error.code, error.details || "", details));
      });
      call.on("metadata", (headers) => {
        returnedId = String(headers.get("x-request-id")[0] || "");
      });
    });
  }

  close() {
    this.client.close();
  }
}

/**
 * Calls CaseExtract over gRPC-Web (HTTP/1.1, as a browser does) with fetch; resolves on success
 * and rejects with a TaskGateError. `baseUrl` is like http://127.0.0.1:50051.
 */
async function caseExtractGrpcWeb(baseUrl, portId, binId, { headers = {} } = {}) {
  const message = CaseExtractRequest.encode({ port_id: portId, bin_id: binId }).finish();
  const body = Buffer.alloc(5 + message.length);
  body.writeUInt8(0, 0);
  body.writeUInt32BE(message.length, 1);
  Buffer.from(message).copy(body, 5);
  const response = await fetch(`${baseUrl}/taskgate.v1.TaskService/CaseExtract`, {
    method: "POST",
    headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", ...headers },
    body,
  });
  const bytes = Buffer.from(await response.arrayBuffer());
  let trailers = new Map();
  for (const [name, value] of response.headers) trailers.set(name, value);
  // A reply with a body carries its status in a trailer frame (flag 0x80) at the end.
  let offset = 0;
  while (offset + 5 <= bytes.length) {
    const flags = bytes.readUInt8(offset);
    const length = bytes.readUInt32BE(offset + 1);
    const payload = bytes.subarray(offset + 5, offset + 5 + length);
    if (flags & 0x80) {
      trailers = new Map();
      for (const line of payload.toString("utf8").split("\r\n")) {
        const colon = line.indexOf(":");
        if (colon > 0) trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
    }
    offset += 5 + length;
  }
  const code = Number(trailers.get("grpc-status"));
  if (code === 0) return;
  const details = trailers.get("grpc-status-details-bin");
  const message_ = decodeURIComponent(trailers.get("grpc-message") || "");
  throw errorFromStatusDetails(code, message_, details ? Buffer.from(details, "base64") : undefined);
}

module.exports = { TaskGate, TaskGateError, FaultCode, caseExtractGrpcWeb, errorFromStatusDetails };
