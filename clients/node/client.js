"use strict";
// A small Node.js client for taskgate's TaskService, loading proto/ at run time (nothing is
// generated or committed), with the rich error details decoded into a TaskGateError. Each
// CaseExtract and CaseCancel call sends a fresh idempotency key (the message's `request_id`, a
// UUID v4, sent also as the `idempotency-key` metadata for a proxy to route on) and keeps it
// across its own retries. Calls are retried on UNAVAILABLE and OVERLOADED: from the gateway,
// these say the controller started nothing (the README's retry contract); a bare UNAVAILABLE
// without ErrorInfo is grpc-js's own, when the connection to the gateway broke, possibly after
// the call reached it. Its retry carries the same key, so the same gateway process does not send
// it twice; a gateway restarted in between, or another replica, has forgotten the key. So after
// an attempt that may have acted, only an answer marked `requestOutcome: unknown` (the gateway
// still holds the key and reads the port first) is retried; any other is thrown, mayHaveActed
// and not retryable. A call given its `idempotencyKey` repeats one that may have acted, so its
// first attempt already counts as one after such an attempt.

const crypto = require("node:crypto");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");
// The metadata that repeats the message's request_id, for a proxy to hash on (README,
// "Idempotency", "What the table does not cover"); the gateway reads only the field.
const IDEMPOTENCY_KEY_HEADER = "idempotency-key";
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
const WatchCaseEventsRequest = taskRoot.lookupType("taskgate.v1.WatchCaseEventsRequest");
const CaseEvent = taskRoot.lookupType("taskgate.v1.CaseEvent");
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

// The retries of one call, as the service config docs/clients.md recommends: at most 4 attempts,
// waiting the RetryInfo delay, or else a backoff from 1 s doubling up to 10 s.
const DEFAULT_MAX_ATTEMPTS = 4;
const INITIAL_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 10000;

// The README's retry contract: besides UNAVAILABLE, the reasons safe to retry as they are (the
// controller was not called); the codes after which the controller may have acted, and the
// reasons that are exceptions to their code's rule.
const RETRYABLE_REASONS = new Set(["OVERLOADED"]);
const MAY_HAVE_ACTED_CODES = new Set([
  grpc.status.UNKNOWN,
  grpc.status.DEADLINE_EXCEEDED,
  grpc.status.INTERNAL,
  grpc.status.CANCELLED,
]);
const NOTHING_SENT_REASONS = new Set(["DEADLINE_TOO_SHORT"]);
const OUTCOME_UNKNOWN_REASONS = new Set(["REQUEST_OUTCOME_UNKNOWN"]);
// The README's gateway errors (its "Gateway errors" table) after which the controller may have
// acted but a repeat with the same key cannot settle what it did, by reason and code: the rows
// whose advice says "not even with the same request_id". UPSTREAM_HTTP_ERROR is one only as
// INTERNAL, not as UNKNOWN. tests/integration/contract.rs checks this copy against the gateway's
// table.
const UNSETTLED_ROWS = new Map([
  ["SHUTDOWN_GRACE_RAN_OUT", grpc.status.UNKNOWN],
  ["REQUEST_OUTCOME_UNKNOWN", grpc.status.FAILED_PRECONDITION],
  ["UPSTREAM_HTTP_ERROR", grpc.status.INTERNAL],
]);
// The ErrorInfo metadata that marks a failed port read after an unknown outcome (README, "Gateway
// errors"): whatever its code, the earlier call may have acted.
const REQUEST_OUTCOME_KEY = "requestOutcome";
const OUTCOME_UNKNOWN = "unknown";

/** A failed call, with everything the status details say. */
class TaskGateError extends Error {
  constructor(fields) {
    const text = `${fields.codeName}: ${fields.message}`;
    super(fields.requestId ? `${text} (request id: ${fields.requestId})` : text);
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
    /**
     * The x-request-id of the attempt that failed (the last one), as the gateway's access line
     * and every log line of the call show it; null when no answer came from the gateway (it
     * could not be reached, or the connection broke before its headers).
     */
    this.requestId = fields.requestId || null;
    /**
     * The call's idempotency key (CaseExtract and CaseCancel), or null: when `repeatSettles`,
     * pass it back as the `idempotencyKey` option to repeat the call, within the gateway's
     * idempotency window.
     */
    this.idempotencyKey = null;
    /** How many times the call was sent before it failed. */
    this.attempts = 1;
    /**
     * Whether an earlier attempt of the same call, retried by TaskGate, may have acted; for a call
     * given its `idempotencyKey`, always: the call it repeats may have.
     */
    this.earlierAttemptMayHaveActed = false;
  }

  /**
   * Whether the error is retried as it is: UNAVAILABLE (after retryDelayMs) and OVERLOADED (with
   * backoff). From the gateway, these say the controller started nothing; a bare UNAVAILABLE
   * without ErrorInfo (the connection to the gateway broke) may have reached it, and is retried
   * with the same key, which only the same gateway process deduplicates. TaskGate retries these
   * itself. Not retryable: an error of a CaseExtract or CaseCancel call that may already have
   * acted (an earlier attempt, or the call it repeats), unless marked `requestOutcome: unknown`.
   * A gateway that forgot the key (restarted, another replica) sent that attempt as a new call:
   * its 1148 most likely means the first operation is running, and retrying until it ends would
   * start a second.
   */
  get retryable() {
    const afterActing = this.idempotencyKey && this.earlierAttemptMayHaveActed;
    if (afterActing && this.metadata?.[REQUEST_OUTCOME_KEY] !== OUTCOME_UNKNOWN) return false;
    return this.code === grpc.status.UNAVAILABLE || RETRYABLE_REASONS.has(this.reason);
  }

  /**
   * Whether the controller may have acted on the call (the README's "Controller may have acted?"
   * column): UNKNOWN, DEADLINE_EXCEEDED (but DEADLINE_TOO_SHORT), INTERNAL,
   * REQUEST_OUTCOME_UNKNOWN, a call cancelled or cut off before an answer (an UNAVAILABLE
   * without the gateway's ErrorInfo), a failed port read after an earlier unknown outcome
   * (metadata requestOutcome: "unknown"), and any error of a call one of whose earlier attempts
   * may have acted. Then, if `repeatSettles`, repeat the call with `idempotencyKey`; else read
   * the port with caseGetState before acting again.
   */
  get mayHaveActed() {
    return this.earlierAttemptMayHaveActed || this.#answerMayHaveActed();
  }

  /** `mayHaveActed` by this answer alone, without the call's earlier attempts. */
  #answerMayHaveActed() {
    if (OUTCOME_UNKNOWN_REASONS.has(this.reason)) return true;
    if (this.metadata?.[REQUEST_OUTCOME_KEY] === OUTCOME_UNKNOWN) return true;
    if (this.code === grpc.status.UNAVAILABLE) return !this.reason;
    return MAY_HAVE_ACTED_CODES.has(this.code) && !NOTHING_SENT_REASONS.has(this.reason);
  }

  /**
   * Whether this answer says the controller may have acted and a repeat of the call with
   * `idempotencyKey` can settle what it did: the gateway process that holds the key answers such
   * a repeat from the first call or from the port, and sends it again only if the port shows it
   * was not acted on (README, "Idempotency: `request_id`"). Judged by this answer alone
   * (`mayHaveActed` without the call's earlier attempts): an answer marked `requestOutcome:
   * unknown`, or one the README's column says may have acted. An unmarked definite answer to a
   * repeat (fault 1148, a kept fault such as 1149, REQUEST_ID_REUSED) means the gateway did not
   * hold the key's unknown outcome: it took the key as new (forgotten after its window, evicted,
   * restarted, another replica) or has a definite answer stored, so a further repeat settles
   * nothing; after 1148 (the first call's operation most likely running), repeating until it
   * ends would start a second. False too after the README's gateway errors whose repeat cannot
   * settle it, marked `requestOutcome: unknown` or not: SHUTDOWN_GRACE_RAN_OUT (the process that
   * held the key has exited, and the one a repeat reaches never saw it, so sends it as a new
   * call, which may move a robot twice), REQUEST_OUTCOME_UNKNOWN (a repeat has already read the
   * port and could not tell) and UPSTREAM_HTTP_ERROR as INTERNAL (a status the task interface
   * never answers, most often a wrong controller URL, which a repeat would read the port through
   * too; fixing it restarts the gateway, which forgets the key). Whenever `mayHaveActed` but not
   * this, read the port with caseGetState before acting again.
   */
  get repeatSettles() {
    return this.#answerMayHaveActed() && UNSETTLED_ROWS.get(this.reason) !== this.code;
  }
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/**
 * Decodes a google.rpc.Status (the grpc-status-details-bin bytes) into a TaskGateError;
 * `requestId` is the x-request-id the gateway answered with, if any.
 */
function errorFromStatusDetails(code, message, detailsBytes, requestId) {
  const fields = {
    code,
    codeName: CODE_NAMES[code] || String(code),
    message,
    requestId,
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

/**
 * Decodes the grpc-status-details-bin of a grpc-js status's metadata into a TaskGateError.
 * `headers` are the response headers, when the gateway sent any before the status.
 */
function errorFromGrpcStatus({ code, details, metadata }, headers) {
  const bytes = metadata ? metadata.get("grpc-status-details-bin")[0] : undefined;
  return errorFromStatusDetails(code, details || "", bytes, requestIdIn(metadata) || requestIdIn(headers));
}

/**
 * The x-request-id in grpc-js metadata, or null. grpc-js gives a trailers-only answer (a call
 * the gateway refused or failed at once) as the status's metadata, with no headers: the id is
 * then there, and otherwise in the headers.
 */
function requestIdIn(metadata) {
  const [value] = metadata ? metadata.get("x-request-id") : [];
  return value ? String(value) : null;
}

/**
 * A CaseEvent as a plain object, the same over gRPC and gRPC-Web: `port_id`; `bin_id` (null
 * when the segment names no bin); `state` (the CaseState name, null for a cancel request);
 * `cancel_request` (true for `CR`, the cancel-request signal, which is not a state);
 * `raw_state` (the vendor code, e.g. "ERSO" or "CR"); `segment` (as the Log Publisher sent it);
 * `received_at` (a Date: when the gateway received the segment).
 */
function caseEventFrom(message) {
  const at = message.received_at;
  return {
    port_id: message.port_id,
    bin_id: message.bin_id ?? null,
    state: message.state ?? null,
    cancel_request: message.cancel_request === true,
    raw_state: message.raw_state,
    segment: message.segment,
    received_at: at ? new Date(Number(at.seconds) * 1000 + Math.floor((at.nanos || 0) / 1e6)) : null,
  };
}

/**
 * An open WatchCaseEvents stream: iterate it with `for await` to receive case events (see
 * caseEventFrom). The stream ends only with an error, thrown from the iteration as a
 * TaskGateError (WATCH_LAGGED, LOG_PUBLISHER_UNAVAILABLE, DEADLINE_REACHED, ...), or when it is
 * cancelled (`cancel()`, or leaving the loop), which ends the iteration quietly.
 */
class CaseEventWatch {
  constructor(events, cancel, requestId) {
    this.events = events;
    this.cancelStream = cancel;
    /** The call's request id, as the gateway logs it. */
    this.requestId = requestId;
  }

  [Symbol.asyncIterator]() {
    return this.events;
  }

  /**
   * Reads the next event: resolves with it, or with null once the watch is cancelled; rejects
   * with the TaskGateError that ended the stream.
   */
  async nextEvent() {
    const { value, done } = await this.events.next();
    return done ? null : value;
  }

  /** Ends the stream; the iteration then stops. */
  cancel() {
    this.cancelStream();
  }
}

// How many received events a native watch holds for a slow reader before it stops reading from
// the connection; the gateway then holds them (up to --watch-buffer) and ends a stream that
// falls further behind with WATCH_LAGGED, rather than this process buffering without bound.
const WATCH_QUEUE = 64;

/**
 * Adapts a grpc-js server stream: resolves with a CaseEventWatch once the gateway has answered
 * the call's headers (it has started the watch), rejects with a TaskGateError when it refused
 * it (a trailers-only reply).
 */
function nativeWatch(call) {
  const queue = [];
  let status = null;
  let ended = false;
  let cancelled = false;
  let headers = null;
  let wake = null;
  const notify = () => {
    if (wake) wake();
    wake = null;
  };
  call.on("data", (message) => {
    queue.push(message);
    if (queue.length >= WATCH_QUEUE) call.pause();
    notify();
  });
  call.on("end", () => {
    ended = true;
    notify();
  });
  // The status says the same as the 'error' event, with its metadata; this listener only keeps
  // an unread error from being thrown as an uncaught exception.
  call.on("error", () => {});
  call.on("status", (received) => {
    status = received;
    notify();
  });
  async function* events() {
    try {
      for (;;) {
        if (queue.length > 0) {
          const message = queue.shift();
          if (queue.length < WATCH_QUEUE) call.resume();
          yield caseEventFrom(message);
        } else if (status && (ended || status.code !== grpc.status.OK)) {
          // Every message is read once the stream has ended; an error status ends it anyway.
          if (status.code === grpc.status.OK || (cancelled && status.code === grpc.status.CANCELLED)) return;
          throw errorFromGrpcStatus(status, headers);
        } else {
          await new Promise((resolve) => {
            wake = resolve;
          });
        }
      }
    } finally {
      if (!status) {
        cancelled = true;
        call.cancel();
      }
    }
  }
  const cancel = () => {
    cancelled = true;
    call.cancel();
  };
  return new Promise((resolve, reject) => {
    call.once("metadata", (received) => {
      headers = received;
      resolve(new CaseEventWatch(events(), cancel, String(headers.get("x-request-id")[0] || "")));
    });
    call.once("status", (received) => reject(errorFromGrpcStatus(received)));
  });
}

/** A connection to a taskgate gateway over gRPC (HTTP/2). */
class TaskGate {
  /** `target` is host:port; `token` a bearer token when the gateway requires one. */
  constructor(target, { token, credentials } = {}) {
    this.client = new TaskService(target, credentials || grpc.credentials.createInsecure());
    this.token = token;
  }

  /**
   * Extracts a case from `binId` at `portId`. Resolves with { requestId (the last attempt's
   * x-request-id, a correlation ID for the logs), idempotencyKey (the message's request_id, the
   * same on every attempt), replayed ("stored" or "resolved" when the gateway answered a repeat
   * of the key without calling the controller's method, else null), attempts }; rejects with a
   * TaskGateError. Options: `timeoutMs` bounds the whole call, retries included (10 s);
   * `requestId` sets the x-request-id; `idempotencyKey` the message's request_id (a fresh UUID v4
   * when unset: give the one a TaskGateError carries to repeat a call whose error says
   * `repeatSettles`; such a repeat may meet its own first call's operation, so it is retried only
   * on an answer marked `requestOutcome: unknown`: a key is for repeats, not for new calls);
   * `maxAttempts` (4)
   * bounds the retries (on UNAVAILABLE and OVERLOADED only).
   */
  caseExtract(portId, binId, options = {}) {
    return this.callWithKey("CaseExtract", { port_id: portId, bin_id: binId }, options);
  }

  /**
   * Cancels the case operation running on `binId` at `portId`, with the options, retries and
   * result of caseExtract; rejects with a TaskGateError (fault 1149 when nothing runs on that bin
   * at the port).
   */
  caseCancel(portId, binId, options = {}) {
    return this.callWithKey("CaseCancel", { port_id: portId, bin_id: binId }, options);
  }

  /** Calls `method` with `request` and an idempotency key; resolves with the call's result. */
  async callWithKey(method, request, { idempotencyKey, ...options }) {
    const key = idempotencyKey || crypto.randomUUID();
    const { requestId, replayed, attempts } = await this.call(
      method,
      { ...request, request_id: key },
      { ...options, repeat: Boolean(idempotencyKey) },
    );
    return { requestId, idempotencyKey: key, replayed, attempts };
  }

  /**
   * Reads the port's AutoCase state; resolves with { port_id, bin_id (null when the controller
   * names none), state (the CaseState name), raw_state (the vendor code, e.g. "ERSO") } and
   * rejects with a TaskGateError. It only reads, so it is retried like the other calls (the
   * options `timeoutMs`, `requestId`, `maxAttempts`), without an idempotency key.
   */
  async caseGetState(portId, options = {}) {
    const { response } = await this.call("CaseGetState", { port_id: portId }, options);
    // proto-loader leaves an unset proto3 `optional` field out, or null with `defaults`.
    return { ...response, bin_id: response.bin_id ?? null };
  }

  /**
   * Watches the AutoCase events of `portIds` (every port when empty) from now on. Resolves with
   * a CaseEventWatch once the gateway has started the watch, so an operation started after that
   * is seen from its first event; rejects with a TaskGateError when the gateway refuses it
   * (LOG_PUBLISHER_UNAVAILABLE, LOG_PUBLISHER_DISABLED, TOO_MANY_WATCHES, INVALID_PARAMETER).
   * `timeoutMs` bounds the whole stream; without it the watch lasts until cancelled. Read the
   * state with caseGetState first, and again after the stream ends with an error: events may
   * have been missed.
   */
  watchCaseEvents(portIds = [], { timeoutMs, requestId } = {}) {
    const options = timeoutMs === undefined ? {} : { deadline: Date.now() + timeoutMs };
    return nativeWatch(this.client.WatchCaseEvents({ port_ids: portIds }, this.metadata(requestId), options));
  }

  /** The call metadata: the token, the request id and the idempotency key, when given. */
  metadata(requestId, idempotencyKey) {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    if (requestId) metadata.set("x-request-id", requestId);
    if (idempotencyKey) metadata.set(IDEMPOTENCY_KEY_HEADER, idempotencyKey);
    return metadata;
  }

  /**
   * Calls `method` with the token and request id, again after each retryable error while
   * `maxAttempts` and `timeoutMs` allow; resolves with { response, requestId, replayed, attempts }
   * or rejects with a TaskGateError. `repeat`: the call repeats one that may have acted (the
   * caller gave its key).
   */
  async call(
    method,
    request,
    { timeoutMs = 10000, requestId, maxAttempts = DEFAULT_MAX_ATTEMPTS, repeat = false } = {},
  ) {
    const deadline = Date.now() + timeoutMs;
    let backoffMs = INITIAL_BACKOFF_MS;
    let mayHaveActed = repeat;
    for (let attempt = 1; ; attempt += 1) {
      try {
        return { ...(await this.attempt(method, request, requestId, deadline)), attempts: attempt };
      } catch (error) {
        error.idempotencyKey = request.request_id || null;
        error.attempts = attempt;
        error.earlierAttemptMayHaveActed = mayHaveActed;
        mayHaveActed = error.mayHaveActed;
        const delayMs = error.retryDelayMs ?? backoffMs;
        if (!error.retryable || attempt >= maxAttempts || Date.now() + delayMs >= deadline) throw error;
        await new Promise((done) => setTimeout(done, delayMs));
        backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
      }
    }
  }

  /** One attempt of a call; resolves with { response, requestId, replayed }. */
  attempt(method, request, requestId, deadline) {
    return new Promise((resolve, reject) => {
      let headers = null;
      const metadata = this.metadata(requestId, request.request_id);
      const call = this.client[method](request, metadata, { deadline }, (error, response) => {
        if (!error) {
          return resolve({
            response,
            requestId: String(headers?.get("x-request-id")[0] || ""),
            replayed: headers?.get("taskgate-replayed")[0]?.toString() ?? null,
          });
        }
        return reject(errorFromGrpcStatus(error, headers));
      });
      call.on("metadata", (received) => {
        headers = received;
      });
    });
  }

  close() {
    this.client.close();
  }
}

/** One gRPC-Web frame: flag byte, 4-byte big-endian length, payload. */
function grpcWebFrame(message) {
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt8(0, 0);
  frame.writeUInt32BE(message.length, 1);
  Buffer.from(message).copy(frame, 5);
  return frame;
}

/**
 * The gRPC-Web frames in `chunks` (an async iterable of byte chunks, such as a fetch body), as
 * { flags, payload }, however the chunks split them: a frame may span chunks and a chunk may
 * hold several frames. Throws if the bytes end inside a frame.
 */
async function* grpcWebFrames(chunks) {
  let pending = Buffer.alloc(0);
  for await (const chunk of chunks) {
    pending = pending.length === 0 ? Buffer.from(chunk) : Buffer.concat([pending, chunk]);
    let offset = 0;
    while (pending.length - offset >= 5) {
      const length = pending.readUInt32BE(offset + 1);
      if (pending.length - offset < 5 + length) break;
      yield { flags: pending.readUInt8(offset), payload: pending.subarray(offset + 5, offset + 5 + length) };
      offset += 5 + length;
    }
    pending = pending.subarray(offset);
  }
  if (pending.length > 0) throw new Error(`the gRPC-Web body ended inside a frame (${pending.length} bytes left)`);
}

/** The headers of a gRPC-Web trailer frame's payload (`name: value` lines), by lowercase name. */
function grpcWebTrailers(payload) {
  const trailers = new Map();
  for (const line of payload.toString("utf8").split("\r\n")) {
    const colon = line.indexOf(":");
    if (colon > 0) trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
  }
  return trailers;
}

/**
 * The TaskGateError a gRPC-Web status (trailers or trailers-only headers) describes, with the
 * x-request-id of the response's headers.
 */
function errorFromGrpcWebTrailers(trailers, headers) {
  const details = trailers.get("grpc-status-details-bin");
  return errorFromStatusDetails(
    Number(trailers.get("grpc-status")),
    decodeURIComponent(trailers.get("grpc-message") || ""),
    details ? Buffer.from(details, "base64") : undefined,
    headers.get("x-request-id"),
  );
}

/**
 * Watches case events over gRPC-Web (HTTP/1.1, as a browser does) with fetch: resolves with a
 * CaseEventWatch like TaskGate.watchCaseEvents does, once the gateway has answered the response
 * head; rejects with a TaskGateError when it refused the watch. Events arrive as the messages
 * of the chunked response body, and the status that ends the stream in its trailer frame (flag
 * 0x80). `timeoutMs` is sent as the grpc-timeout header: the gateway enforces it.
 */
async function watchCaseEventsGrpcWeb(baseUrl, portIds = [], { headers = {}, timeoutMs } = {}) {
  const body = grpcWebFrame(WatchCaseEventsRequest.encode({ port_ids: portIds }).finish());
  const requestHeaders = { "content-type": "application/grpc-web+proto", "x-grpc-web": "1", ...headers };
  if (timeoutMs !== undefined) requestHeaders["grpc-timeout"] = `${Math.ceil(timeoutMs)}m`;
  const abort = new AbortController();
  const response = await fetch(`${baseUrl}/taskgate.v1.TaskService/WatchCaseEvents`, {
    method: "POST",
    headers: requestHeaders,
    body,
    signal: abort.signal,
  });
  // A refusal is trailers-only: the status is in the response head and the body is empty.
  if (response.headers.has("grpc-status")) {
    await response.body?.cancel();
    throw errorFromGrpcWebTrailers(new Map(response.headers), response.headers);
  }
  let cancelled = false;
  let finished = false;
  async function* events() {
    try {
      for await (const { flags, payload } of grpcWebFrames(response.body)) {
        if (flags & 0x80) {
          finished = true;
          const trailers = grpcWebTrailers(payload);
          if (Number(trailers.get("grpc-status")) === 0) return;
          throw errorFromGrpcWebTrailers(trailers, response.headers);
        }
        yield caseEventFrom(CaseEvent.toObject(CaseEvent.decode(payload), { enums: String, longs: Number }));
      }
      throw errorFromStatusDetails(
        grpc.status.INTERNAL,
        "the gRPC-Web stream ended without a trailer frame",
        undefined,
        response.headers.get("x-request-id"),
      );
    } catch (error) {
      if (error instanceof TaskGateError) throw error;
      if (cancelled) return;
      throw errorFromStatusDetails(
        grpc.status.UNAVAILABLE,
        `the gRPC-Web stream broke off: ${error.message}`,
        undefined,
        response.headers.get("x-request-id"),
      );
    } finally {
      if (!finished) {
        cancelled = true;
        abort.abort();
      }
    }
  }
  const cancel = () => {
    cancelled = true;
    abort.abort();
  };
  return new CaseEventWatch(events(), cancel, response.headers.get("x-request-id") || "");
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
  throw errorFromGrpcWebTrailers(trailers, response.headers);
}

module.exports = {
  TaskGate,
  TaskGateError,
  CaseEventWatch,
  DEFAULT_MAX_ATTEMPTS,
  FaultCode,
  caseExtractGrpcWeb,
  watchCaseEventsGrpcWeb,
  grpcWebFrames,
  errorFromStatusDetails,
};
