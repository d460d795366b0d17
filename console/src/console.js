// The operator console: one tile per port, kept live by the README's watch-then-state pattern,
// a timeline of case events, and confirmed extract and cancel forms. It calls the gateway that
// served it, over gRPC-Web (Connect-ES), and reads every error's details as the other clients do.
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { CaseState, TaskFaultSchema, TaskService } from "../gen/taskgate/v1/task_pb.js";
import { BadRequestSchema, ErrorInfoSchema, RetryInfoSchema } from "../gen/google/rpc/error_details_pb.js";

// Where the gateway says what to show: the ports, whether calls need a token, the deadline of
// every call but the watch (its --upstream-timeout and a margin), and the fault, gateway-error
// and code-name tables every status is built from.
const CONFIG_PATH = "/console/config.json";
// Watching again after an error without a RetryInfo delay: doubling up to the cap, as the
// gateway's own Log Publisher client does, each wait ±20 % so that the pages a gateway's restart
// cut off do not all come back at once.
const FIRST_BACKOFF_MS = 500;
const MAX_BACKOFF_MS = 10000;
const JITTER = 0.2;
// At most this many state reads at once: the browser keeps six HTTP/1.1 connections to the
// gateway, one of them the watch's, and a form's call must not wait behind a page of reads.
const MAX_READS_IN_FLIGHT = 4;
// A failed read is tried again only when trying again can cure it; a read changes nothing, so it
// is always safe to. The others (a port that is not an AutoCase port, a wrong token) change only
// with an event or a new watch, which read the tile anyway.
const REREAD_CODES = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.ResourceExhausted, Code.Aborted, Code.Unknown]);
// Refusals that watching or reading again cannot cure, only a person: the page stops calling
// (each try would be another warning in the gateway's log) until a token is given.
const STOP_CODES = new Set([Code.Unauthenticated, Code.PermissionDenied, Code.InvalidArgument]);
// The gateway's answer to a repeat it did not send to the controller (README, Idempotency): a
// repeat must not look like a new success.
const REPLAYED_HEADER = "taskgate-replayed";
const REPLAYED = {
  stored: "answered from the first call; nothing new was sent",
  resolved: "the port showed the first call accepted; nothing new was sent",
};
const TIMELINE_LENGTH = 100;
const UINT32_MAX = 4294967295;
// What config.json must hold, field by field. An answer of another shape (what a misconfigured
// proxy may answer with HTTP 200) is settings that could not be read, as an answer that is not
// JSON is: the banner names what is wrong with it, and it is read again. The page never uses it.
const STRING = shape("a string", (value) => typeof value === "string");
const BOOLEAN = shape("true or false", (value) => typeof value === "boolean");
const WHOLE_NUMBER = shape("a whole number", (value) => Number.isSafeInteger(value) && value >= 0);
const FAULT_ROW = record({ name: STRING, meaning: STRING, advice: STRING, mayHaveActed: BOOLEAN });
const CONFIG_SHAPE = record({
  ports: distinct(list(shape(`a port number (0 to ${UINT32_MAX})`, (value) => Number.isInteger(value) && value >= 0 && value <= UINT32_MAX))),
  auth: BOOLEAN,
  callDeadlineMs: shape("a whole number of milliseconds above 0", (value) => Number.isSafeInteger(value) && value > 0),
  idempotencyWindowMs: WHOLE_NUMBER,
  instance: STRING,
  faults: table(FAULT_ROW),
  unknownFault: FAULT_ROW,
  internalFault: FAULT_ROW,
  documentedFaults: list(WHOLE_NUMBER, 2),
  gatewayDomain: STRING,
  gatewayErrors: list(record({ reason: STRING, code: WHOLE_NUMBER, advice: STRING, mayHaveActed: BOOLEAN, repeatSameKey: BOOLEAN, unsettled: BOOLEAN, keyClaimed: BOOLEAN })),
  codeNames: list(STRING),
});

const page = {
  banner: document.getElementById("banner"),
  tiles: document.getElementById("tiles"),
  timeline: document.getElementById("timeline"),
  result: document.getElementById("result"),
  confirm: document.getElementById("confirm"),
  confirmText: document.getElementById("confirm-text"),
  confirmYes: document.getElementById("confirm-yes"),
  confirmNo: document.getElementById("confirm-no"),
  tokenForm: document.getElementById("token-form"),
  token: document.getElementById("token"),
  tokenState: document.getElementById("token-state"),
};

// What the gateway's config.json said, as text (to tell whether it changed) and read, and the
// tiles built from it.
const current = { configText: null, config: null, tiles: new Map() };

// The bearer token lives only here, in this tab's memory: never in storage, a cookie or the URL.
let bearerToken = "";
// Aborting it ends the current watch, or its wait before watching again.
let watching = new AbortController();
// State reads under way, and those waiting for one of them to end (MAX_READS_IN_FLIGHT).
let readsInFlight = 0;
const readsWaiting = [];

const client = createClient(
  TaskService,
  createGrpcWebTransport({
    baseUrl: window.location.origin,
    interceptors: [
      (next) => (request) => {
        if (bearerToken) request.header.set("authorization", `Bearer ${bearerToken}`);
        return next(request);
      },
    ],
  }),
);

main().catch((error) => showBanner(`The console could not start: ${error.message}`));

async function main() {
  setUpToken();
  setUpAction("extract", (portId, binId, requestId) => ({
    question: `Extract a case from bin ${binId} at port ${portId}? A robot will move.`,
    confirm: "Extract",
    describe: `case_extract port ${portId} bin ${binId}`,
    success: "the controller accepted the case extraction",
    call: (options) => client.caseExtract({ portId, binId, requestId }, options),
  }));
  setUpAction("cancel", (portId, binId, requestId) => ({
    question: `Cancel the case operation on bin ${binId} at port ${portId}?`,
    confirm: "Cancel the operation",
    describe: `case_cancel port ${portId} bin ${binId}`,
    success: "the controller accepted the cancel",
    call: (options) => client.caseCancel({ portId, binId, requestId }, options),
  }));
  // Until the gateway answers: a page loaded just before it went away starts once it is back.
  let backoffMs = FIRST_BACKOFF_MS;
  for (let failure = await loadConfig(); failure !== null; failure = await loadConfig()) {
    const delayMs = jittered(backoffMs);
    backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
    showBanner(settingsBanner(failure));
    await sleep(delayMs, watching.signal);
  }
  follow();
}

// What the banner says of settings that could not be read (loadConfig's failure), and when they
// are read again.
function settingsBanner(failure) {
  return failure instanceof TypeError
    ? `The gateway cannot be reached; trying again within ${seconds(MAX_BACKOFF_MS)}.`
    : `The console's settings could not be read (${failure.message}); trying again within ${seconds(MAX_BACKOFF_MS)}.`;
}

// Settings that could not be read again after a watch error: no watch was sent, so the banner
// names the settings, not a watch.
class SettingsUnread extends Error {
  constructor(failure) {
    super(failure.message);
    this.failure = failure;
  }
}

// Fetches config.json, and builds the tiles and the token field anew when it changed (a new
// gateway behind the same address). Null once it is read; else why not: a TypeError when the
// gateway cannot be reached, an Error naming the HTTP status (a reverse proxy's 502 or 503
// while the gateway is away) or what is wrong with the answer (not JSON, or not of
// CONFIG_SHAPE). Settings that could not be read leave the page's as they were.
async function loadConfig(signal) {
  let text;
  let config;
  try {
    // Bounded: a proxy that takes the request and never answers must not leave the page
    // waiting with no banner.
    const bounded = AbortSignal.any([signal ?? new AbortController().signal, AbortSignal.timeout(MAX_BACKOFF_MS)]);
    const response = await fetch(CONFIG_PATH, { cache: "no-cache", signal: bounded });
    if (!response.ok) return new Error(`${CONFIG_PATH} answered HTTP ${response.status}`);
    text = await response.text();
    if (text === current.configText) return null;
    config = JSON.parse(text);
  } catch (error) {
    return error instanceof TypeError ? error : new Error(`${CONFIG_PATH}: ${error.message}`);
  }
  const wrong = CONFIG_SHAPE(config, null);
  if (wrong !== null) return new Error(`${CONFIG_PATH}: ${wrong}`);
  page.tiles.replaceChildren();
  current.tiles = new Map(config.ports.map((portId) => [portId, makeTile(portId)]));
  page.tokenForm.hidden = !config.auth;
  current.config = config;
  current.configText = text;
  return null;
}

// A check of a value against what the page needs of it: null if it holds, else what is wrong,
// naming the value by its `path` in the answer ("ports[1] is -1, not a port number (0 to
// 4294967295)"); the path of the answer itself is null.
function shape(expected, holds) {
  return (value, path) => (holds(value) ? null : `${path} is ${kind(value)}, not ${expected}`);
}

// A list of values of `element`'s shape; of `length` values when one is given.
function list(element, length) {
  const expected = length === undefined ? "a list" : `a list of ${length}`;
  return (value, path) => {
    if (!Array.isArray(value) || (length !== undefined && value.length !== length)) return `${path} is ${kind(value)}, not ${expected}`;
    for (const [index, item] of value.entries()) {
      const wrong = element(item, `${path}[${index}]`);
      if (wrong !== null) return wrong;
    }
    return null;
  };
}

// A list of `ports`' shape that names at least one port, and none twice: the page would show no
// tile for an empty list, which watches every port, and a tile never updated for a repeat.
function distinct(ports) {
  return (value, path) => {
    const wrong = ports(value, path);
    if (wrong !== null) return wrong;
    if (value.length === 0) return `${path} is an empty list, not a list of at least one port`;
    const index = value.findIndex((port, at) => value.indexOf(port) !== at);
    return index === -1 ? null : `${path}[${index}] repeats port ${value[index]}`;
  };
}

// An object with each of `fields`, of its shape; other fields are let be.
function record(fields) {
  return (value, path) => {
    if (!isObject(value)) return `${path ?? "the answer"} is ${kind(value)}, not an object`;
    for (const [name, field] of Object.entries(fields)) {
      const at = path === null ? name : `${path}.${name}`;
      if (!Object.hasOwn(value, name)) return `${at} is missing`;
      const wrong = field(value[name], at);
      if (wrong !== null) return wrong;
    }
    return null;
  };
}

// An object whose every value has `row`'s shape, whatever its keys.
function table(row) {
  return (value, path) => {
    if (!isObject(value)) return `${path} is ${kind(value)}, not an object`;
    for (const [key, item] of Object.entries(value)) {
      const wrong = row(item, `${path}[${JSON.stringify(key)}]`);
      if (wrong !== null) return wrong;
    }
    return null;
  };
}

function isObject(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

// What a JSON value is, as a person reads it: numbers and true or false as they are (a wrong
// one is often a near miss), anything else by its kind (a string may be a page of HTML).
function kind(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return value.length === 0 ? "an empty list" : `a list of ${value.length}`;
  switch (typeof value) {
    case "number":
    case "boolean":
      return String(value);
    case "string":
      return "a string";
    default:
      return "an object";
  }
}

// === the tiles: watch first, then read the state, then apply every event ===

async function follow() {
  let backoffMs = FIRST_BACKOFF_MS;
  // After a watch error the gateway may be another one (a restart, a new address behind a
  // proxy): its settings are read again first, as they may have changed, auth with them. Only a
  // lag is certain to leave the same gateway behind.
  let rereadConfig = false;
  for (;;) {
    const signal = watching.signal;
    try {
      if (rereadConfig) {
        const failure = await loadConfig();
        if (failure !== null) throw new SettingsUnread(failure);
      }
      rereadConfig = false;
      await watchThenState(current.config, current.tiles, signal, () => { backoffMs = FIRST_BACKOFF_MS; });
      throw new Error("the watch ended without a status");
    } catch (error) {
      if (signal.aborted) {
        watching = new AbortController();
        continue;
      }
      const config = current.config;
      const tiles = current.tiles;
      const problem = describeError(error, config);
      rereadConfig = problem.reason !== "WATCH_LAGGED";
      if (STOP_CODES.has(problem.code)) {
        markStale(tiles);
        // The gateway that refused may not be the one whose settings the page has: read them
        // before waiting for a person, who may need the token form they show.
        rereadConfig = (await loadConfig()) !== null;
        if (problem.code === Code.Unauthenticated) {
          // Whatever the settings said: this gateway wants a token.
          page.tokenForm.hidden = false;
          showBanner(bearerToken
            ? "The token given was refused (UNAUTHENTICATED): enter a valid one below."
            : "Calls need a valid bearer token: enter one below.", problem.requestId);
        } else {
          const cure = current.config.auth ? "Enter another token below, or reload" : "Reload";
          showBanner(`${problem.message} (${problem.codeName}${problem.reason ? ` ${problem.reason}` : ""}). ${cure} the page once the cause is fixed.`,
            problem.requestId);
        }
        // Until the token form is submitted, which aborts this.
        await aborted(signal);
      } else if (problem.reason === "LOG_PUBLISHER_DISABLED") {
        // Nothing to watch: the tiles are read now and again, and say when.
        await Promise.all([...tiles.values()].map((tile) => readState(tile, config, signal).catch(() => {})));
        showBanner(`Live updates are off: the gateway runs without a Log Publisher (LOG_PUBLISHER_DISABLED). The tiles are read every ${seconds(MAX_BACKOFF_MS)}.`);
        await sleep(MAX_BACKOFF_MS, signal);
      } else {
        // The gateway's RetryInfo delay when it sends one, but never less than the first
        // backoff: `--retry-delay 0s` must not make every open page watch again in a loop.
        const delayMs = Math.max(problem.retryDelayMs ?? jittered(backoffMs), FIRST_BACKOFF_MS);
        backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
        markStale(tiles);
        // The gateway's delay is the same every time; a backoff's changes with every try, so
        // the banner gives its cap, and does not change while the cause stays.
        const when = problem.retryDelayMs === null ? `within ${seconds(MAX_BACKOFF_MS)}` : `in ${seconds(delayMs)}`;
        if (error instanceof SettingsUnread) {
          showBanner(`${settingsBanner(error.failure)} Tiles may be out of date.`);
        } else if (problem.unreachable) {
          showBanner(`The gateway cannot be reached; trying again ${when}. Tiles may be out of date.`);
        } else {
          showBanner(`${watchProblem(problem)} Tiles may be out of date; watching again ${when}.`, problem.requestId);
        }
        await sleep(delayMs, signal);
      }
      if (signal.aborted) watching = new AbortController();
    }
  }
}

function markStale(tiles) {
  for (const tile of tiles.values()) {
    tile.element.classList.add("stale");
    // A read that is tried again would unmark a tile that no event can reach now.
    tile.generation += 1;
  }
}

// Opens the watch, then reads every tile, then applies each event until the stream ends;
// `live()` is called once the tiles are current.
async function watchThenState(config, tiles, signal, live) {
  let opened;
  const open = new Promise((resolve) => { opened = resolve; });
  const events = client.watchCaseEvents({ portIds: config.ports }, {
    signal,
    timeoutMs: 0,
    // Headers without a status: the gateway has opened the watch, so no event can fall between
    // it and the state read next. An error comes as headers with a status, and ends the stream.
    onHeader: (headers) => { if (!headers.has("grpc-status")) opened(); },
  })[Symbol.asyncIterator]();
  let next = events.next();
  // Handled below; this keeps an early error from being reported as unhandled meanwhile.
  next.catch(() => {});
  await Promise.race([open, next]);
  await Promise.all([...tiles.values()].map((tile) => readState(tile, config, signal)));
  hideBanner();
  live();
  for (;;) {
    const { value: event, done } = await next;
    if (done) return;
    applyEvent(tiles.get(event.portId), event);
    next = events.next();
    next.catch(() => {});
  }
}

// Reads the tile's state, and resolves with the first answer. A read that failed in a way a
// retry can cure (REREAD_CODES) is tried again meanwhile, after the RetryInfo delay or a backoff
// (0.5 s doubling to 10 s), until it succeeds, an event or a newer read tells the tile's state,
// or the watch ends.
async function readState(tile, config, signal) {
  tile.generation += 1;
  const generation = tile.generation;
  const retryAfterMs = await readOnce(tile, config, signal, generation, jittered(FIRST_BACKOFF_MS));
  if (retryAfterMs !== null) readAgain(tile, config, signal, generation, retryAfterMs).catch(() => {});
}

async function readAgain(tile, config, signal, generation, delayMs) {
  let backoffMs = FIRST_BACKOFF_MS;
  let retryAfterMs = delayMs;
  while (retryAfterMs !== null) {
    await sleep(retryAfterMs, signal);
    if (signal.aborted || tile.generation !== generation) return;
    backoffMs = Math.min(backoffMs * 2, MAX_BACKOFF_MS);
    retryAfterMs = await readOnce(tile, config, signal, generation, jittered(backoffMs));
  }
}

// One read, shown on the tile unless something newer has been; the delay before reading again,
// or null when that would not help.
async function readOnce(tile, config, signal, generation, backoffMs) {
  try {
    const state = await withReadSlot(() => client.caseGetState({ portId: tile.portId }, { signal, timeoutMs: config.callDeadlineMs }));
    if (tile.generation === generation) showState(tile, state.rawState, CaseState[state.state], state.binId, "read");
    return null;
  } catch (error) {
    if (signal.aborted) throw error;
    if (tile.generation !== generation) return null;
    const problem = describeError(error, config);
    const retryAfterMs = REREAD_CODES.has(problem.code) ? Math.max(problem.retryDelayMs ?? backoffMs, FIRST_BACKOFF_MS) : null;
    showTileError(tile, problem, retryAfterMs);
    return retryAfterMs;
  }
}

async function withReadSlot(read) {
  while (readsInFlight >= MAX_READS_IN_FLIGHT) await new Promise((resolve) => readsWaiting.push(resolve));
  readsInFlight += 1;
  try {
    return await read();
  } finally {
    readsInFlight -= 1;
    readsWaiting.shift()?.();
  }
}

function showTileError(tile, problem, retryAfterMs) {
  tile.element.className = "tile error";
  delete tile.element.dataset.state;
  showName(tile.code, problem.codeName);
  showName(tile.name, problem.fault ? `${problem.fault.code} ${problem.fault.name}` : problem.reason ?? "");
  tile.bin.textContent = "";
  const id = problem.requestId ? ` Request id ${problem.requestId}.` : "";
  // The page's own plan for a read it tries again, rather than advice for a call that may act.
  const retry = retryAfterMs === null ? `Retry: ${problem.retry}; ${problem.advice}.` : `Reading again in ${seconds(retryAfterMs)}.`;
  tile.detail.textContent = `${problem.fault?.meaning ?? problem.message} ${retry}${id}`;
}

function applyEvent(tile, event) {
  if (!tile) return;
  const name = event.change.case === "state" ? CaseState[event.change.value] : "CANCEL_REQUEST";
  addToTimeline(event, name);
  // `CR` is a signal, not a state: the port's state follows in its own event.
  if (event.change.case !== "state") return;
  // Newer than any read still under way for the tile.
  tile.generation += 1;
  showState(tile, event.rawState, name, event.binId, "event");
}

function showState(tile, rawState, name, binId, how) {
  tile.element.className = `tile state-${rawState}`;
  tile.element.dataset.state = rawState;
  tile.code.textContent = rawState;
  showName(tile.name, name);
  tile.bin.textContent = binId === undefined ? "no bin" : `bin ${binId}`;
  tile.detail.textContent = `${how === "read" ? "read" : "event"} at ${clock(new Date())}`;
}

// Shows a code's or a name's UPPER_SNAKE words in `element`, with a line break allowed after each
// underscore (<wbr>, which copies as nothing), so that a narrow tile wraps FAILED_PRECONDITION
// between its words, not inside one.
function showName(element, text) {
  element.replaceChildren();
  text.split(/(?<=_)/).forEach((part, index) => {
    if (index > 0) element.append(document.createElement("wbr"));
    element.append(part);
  });
}

function makeTile(portId) {
  const element = document.createElement("li");
  element.className = "tile";
  element.dataset.port = String(portId);
  const part = (className, text = "") => {
    const child = document.createElement("div");
    child.className = className;
    child.textContent = text;
    element.append(child);
    return child;
  };
  part("port", `Port ${portId}`);
  // `generation` counts what told the tile its state (reads started, events), so that an
  // answer to an older read does not overwrite a newer state.
  const tile = { portId, element, generation: 0, code: part("code", "…"), name: part("name"), bin: part("bin"), detail: part("detail") };
  page.tiles.append(element);
  return tile;
}

function addToTimeline(event, name) {
  const item = document.createElement("li");
  const at = event.receivedAt ? new Date(Number(event.receivedAt.seconds) * 1000 + event.receivedAt.nanos / 1e6) : new Date();
  const bin = event.binId === undefined ? "no bin" : `bin ${event.binId}`;
  item.textContent = `${clock(at)} port ${event.portId} ${bin} ${event.rawState} (${name})`;
  page.timeline.prepend(item);
  while (page.timeline.children.length > TIMELINE_LENGTH) page.timeline.lastElementChild.remove();
}

// === the forms: check, confirm, call, show the outcome ===

// Each submit is a new call with a fresh idempotency key; only "Repeat this call" sends one again
// with the same key, so that the gateway answers a repeat of a call it already sent with the
// first call's outcome instead of acting twice. It is offered only where that is the advice (the
// gateway-error table's `repeatSameKey`, a failed read after an unknown outcome whose row is not
// `unsettled`, the page's own deadline, no answer at all), and refused once the gateway that got
// the first call has restarted or its --idempotency-window has passed: the same key would then
// be a new call.
function setUpAction(name, plan) {
  const form = document.getElementById(`${name}-form`);
  const portInput = document.getElementById(`${name}-port`);
  const binInput = document.getElementById(`${name}-bin`);
  form.addEventListener("submit", (submitted) => {
    submitted.preventDefault();
    oneAtATime(() => submit(portInput, binInput, plan));
  });
}

// A submitted form: its numbers checked, then a new call with a fresh key, once confirmed.
async function submit(portInput, binInput, plan) {
  const portId = wholeNumber(portInput.value);
  const binId = wholeNumber(binInput.value);
  const wrong = [["port_id", portInput, portId], ["bin_id", binInput, binId]].find(([, , value]) => value === null);
  if (wrong) {
    showLocalError(`${wrong[0]}: "${wrong[1].value}" is not a whole number from 0 to ${UINT32_MAX}`);
    wrong[1].focus();
    return;
  }
  if (!current.config) {
    showLocalError("the console has not started yet: the gateway cannot be reached");
    return;
  }
  const requestId = idempotencyKey();
  await send({ ...plan(portId, binId, requestId), requestId });
}

// Whether an action is under way, from the click that starts it to its outcome: its dialog, a
// repeat's check of the gateway, its call. Taken before anything is awaited, so that a second
// action cannot start in any of those waits and two calls can never be under way at once.
let acting = false;

async function oneAtATime(action) {
  if (acting) return;
  acting = true;
  setBusy(true);
  try {
    await action();
  } catch (error) {
    showLocalError(`the console could not finish the action: ${error.message}`);
  } finally {
    acting = false;
    setBusy(false);
  }
}

async function send(action) {
  if (!(await confirmed(action))) return;
  const config = current.config;
  action.firstSent = { instance: config.instance, at: Date.now(), windowMs: config.idempotencyWindowMs };
  await call(action, config);
}

async function repeat(action) {
  const question = `Repeat this call with the same idempotency key ${action.requestId}? ${action.question}`;
  if (!(await confirmed({ ...action, question, confirm: `Repeat: ${action.confirm}` }))) return;
  page.result.className = "result sending";
  page.result.replaceChildren(heading(`checking the gateway before repeating: ${action.describe} (idempotency key ${action.requestId})`));
  // A gateway that restarted, or forgot the key, would take the repeat for a new call. Bounded:
  // the page does nothing else meanwhile.
  const tiles = current.tiles;
  const failure = await loadConfig(AbortSignal.timeout(current.config.callDeadlineMs));
  if (failure !== null) {
    showLocalError(`the repeat was not sent: the gateway's settings could not be read (${failure instanceof TypeError ? "the gateway cannot be reached" : failure.message})`);
    return;
  }
  // Settings that changed (other ports, say) built new tiles, which the watch under way does
  // not follow: it watches again, for their ports, and reads them.
  if (current.tiles !== tiles) watching.abort();
  const { instance, at, windowMs } = action.firstSent;
  // Refused unless both hold, and so whenever a value is missing: a repeat that cannot be shown
  // safe is not sent.
  const sameGateway = typeof instance === "string" && current.config.instance === instance;
  const withinWindow = Date.now() - at < windowMs;
  if (!(sameGateway && withinWindow)) {
    showLocalError("the gateway restarted (or no longer remembers this key after --idempotency-window): read the port's tile and decide");
    return;
  }
  await call(action, current.config, { repeat: true });
}

// One call at a time: two outcomes must not race for #result, and the last outcome's Repeat is
// withdrawn once another call is under way.
async function call(action, config, { repeat = false } = {}) {
  page.result.className = "result sending";
  page.result.replaceChildren(heading(`sending: ${action.describe} (idempotency key ${action.requestId})`));
  try {
    let gatewayRequestId;
    let replayed;
    await action.call({
      timeoutMs: config.callDeadlineMs,
      onHeader: (headers) => {
        gatewayRequestId = headers.get("x-request-id");
        replayed = headers.get(REPLAYED_HEADER);
      },
    });
    showSuccess(`ok: ${action.describe}: ${replayedNote(replayed) ?? action.success}`, gatewayRequestId);
  } catch (error) {
    showFailure(action, describeError(error, config, repeat));
  }
}

// What the gateway's REPLAYED_HEADER says of an answer, success or failure: null for a call it
// sent to the controller. A value the page does not know is still a repeat, never a fresh answer.
function replayedNote(replayed) {
  if (replayed === null || replayed === undefined) return null;
  return Object.hasOwn(REPLAYED, replayed) ? REPLAYED[replayed] : `answered as a repeat (${REPLAYED_HEADER}: ${replayed})`;
}

function setBusy(busy) {
  for (const button of document.querySelectorAll("form.action button[type=submit], #repeat")) button.disabled = busy;
}

function confirmed(action) {
  page.confirmText.textContent = action.question;
  page.confirmYes.textContent = action.confirm;
  return new Promise((resolve) => {
    const finish = (answer) => {
      page.confirmYes.onclick = null;
      page.confirmNo.onclick = null;
      page.confirm.onclose = null;
      if (page.confirm.open) page.confirm.close();
      resolve(answer);
    };
    page.confirmYes.onclick = () => finish(true);
    page.confirmNo.onclick = () => finish(false);
    // Escape closes the dialog: the same as Back.
    page.confirm.onclose = () => finish(false);
    page.confirm.showModal();
    page.confirmNo.focus();
  });
}

// A fresh UUID v4 for a call's request_id. Not crypto.randomUUID(): browsers offer it only to
// secure contexts, and a gateway on a plant network is often served over plain http.
function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function wholeNumber(text) {
  const trimmed = text.trim();
  if (!/^\d+$/.test(trimmed)) return null;
  const value = Number(trimmed);
  return value <= UINT32_MAX ? value : null;
}

function showSuccess(text, requestId) {
  page.result.className = "result";
  page.result.replaceChildren(heading(text));
  if (requestId) page.result.append(facts([["Request id", requestId]]));
}

function showLocalError(text) {
  page.result.className = "result failed";
  page.result.replaceChildren(heading(`not sent: ${text}`));
}

function showFailure(action, problem) {
  page.result.className = "result failed";
  const rows = [];
  if (problem.fault) {
    rows.push(["Fault", `${problem.fault.code} ${problem.fault.name}`], ["Meaning", problem.fault.meaning]);
  } else if (problem.reason) {
    rows.push(["Reason", problem.reason]);
  }
  for (const violation of problem.violations) rows.push(["Field", `${violation.field}: ${violation.description}`]);
  rows.push(["Retry", problem.retry], ["Advice", problem.advice]);
  rows.push(["Message", problem.message]);
  if (problem.requestId) rows.push(["Request id", problem.requestId]);
  if (problem.mayHaveActed) rows.push(["Idempotency key", action.requestId]);
  const outcome = problem.unreachable ? "the gateway cannot be reached" : problem.codeName;
  // A failure the gateway answered from the first call with this key, as a success can be: the
  // operator is told that nothing new reached the controller.
  const replayed = replayedNote(problem.replayed);
  page.result.replaceChildren(heading(`failed: ${action.describe}: ${outcome}${replayed === null ? "" : `, ${replayed}`}`), facts(rows));
  if (problem.repeatSameKey) {
    const button = document.createElement("button");
    button.type = "button";
    button.id = "repeat";
    button.textContent = "Repeat this call";
    button.addEventListener("click", () => oneAtATime(() => repeat(action)));
    page.result.append(button);
  }
}

function heading(text) {
  const element = document.createElement("h3");
  element.textContent = text;
  return element;
}

function facts(rows) {
  const list = document.createElement("dl");
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = term;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
  return list;
}

// === errors: what a person needs from a status ===

// The code, the fault or the gateway's reason with its meaning, whether a retry is safe (as
// `taskgate case-extract` prints it: from the RetryInfo) and what to do (from the gateway's own
// tables), the field violations and the request id.
function describeError(error, config, repeat = false) {
  const status = ConnectError.from(error);
  const [info] = status.findDetails(ErrorInfoSchema);
  const [taskFault] = status.findDetails(TaskFaultSchema);
  const [retryInfo] = status.findDetails(RetryInfoSchema);
  const violations = status.findDetails(BadRequestSchema).flatMap((bad) => bad.fieldViolations);
  const codeName = grpcCodeName(status.code, config);
  const delay = retryInfo?.retryDelay;
  const retryDelayMs = delay ? Number(delay.seconds) * 1000 + Math.round(delay.nanos / 1e6) : null;
  const fault = taskFault ? faultRow(taskFault.rawCode, config) : null;
  // The browser's fetch failed without any answer: Connect-ES calls that UNKNOWN with the
  // browser's own words ("Failed to fetch"), which tell a person nothing.
  const unreachable = !status.isWireError && status.cause instanceof TypeError;
  // Without the gateway's ErrorInfo (the page's own deadline, a connection lost on the way), the
  // call may still have reached the controller.
  const gatewayRow = gatewayError(info, status.code, config);
  // A repeat whose read of the port failed (README, Idempotency): whatever the read's own row
  // says, the earlier call with this key may have acted, so a new call with a fresh key could act
  // twice. As the CLI does, this outcome is unknown, and no retry is safe but the same key's;
  // unless the row says that repeat cannot settle it either (the gateway is stopping, say): its
  // advice, to read the port, then stands.
  const earlierUnknown = info?.metadata.requestOutcome === "unknown" && !gatewayRow?.unsettled;
  // A Repeat refused after the gateway took its key, neither marked as above nor replayed: the
  // gateway no longer held the first call's outcome (its entry was evicted, say) and took the
  // repeat as new, so sending it again, however the refusal invites it, would be a new call
  // while the first may have acted (after 1148, it may be what the controller is busy with).
  // As the CLI does, the port is read first.
  const takenAsNew = repeat && info?.metadata.requestOutcome !== "unknown" &&
    !status.metadata.get(REPLAYED_HEADER) &&
    (fault ? !fault.mayHaveActed : gatewayRow !== null && gatewayRow.keyClaimed && !gatewayRow.mayHaveActed);
  const advice = (earlierUnknown
    ? "not with a new call: the earlier call with this key may have acted; repeat it with the same key (the gateway reads the port first), or read the port's tile and decide"
    : takenAsNew
    ? "not at once: the gateway took this repeat as a new call, and the first call with this key may have acted; read the port's tile first"
    : fault?.advice ?? gatewayRow?.advice ??
      "not at once: the controller may have acted; check the port's tile first").replaceAll("`", "");
  // Unknown unless the gateway's tables say the controller did not act: a repeat of the call
  // must then carry the same idempotency key.
  const mayHaveActed = earlierUnknown || (fault?.mayHaveActed ?? gatewayRow?.mayHaveActed ?? status.code !== Code.Canceled);
  // Where a repeat with the same key is the advice: the gateway's table says so for its rows;
  // after a failed read of the port after an earlier unknown outcome (README, Idempotency), the
  // page's own deadline or no answer at all, the repeat reads the port before it acts. Never
  // after a fault: the controller answered, and the fault table's advice is what to do.
  const ownDeadline = !status.isWireError && status.code === Code.DeadlineExceeded;
  const repeatSameKey = !fault &&
    (earlierUnknown || (gatewayRow?.repeatSameKey ?? (!info && (unreachable || ownDeadline))));
  return {
    code: status.code,
    codeName,
    reason: info?.reason ?? null,
    fault,
    violations,
    retry: retryDelayMs === null || earlierUnknown || takenAsNew ? "not advised" : `safe after ${cliDuration(retryDelayMs)}`,
    advice,
    retryDelayMs,
    unreachable,
    mayHaveActed,
    repeatSameKey,
    message: unreachable
      ? `the gateway cannot be reached: the browser got no answer from ${window.location.host} (${status.rawMessage})`
      : status.rawMessage,
    requestId: status.metadata.get("x-request-id"),
    replayed: status.metadata.get(REPLAYED_HEADER),
  };
}

// The gRPC name of a code, as the README, the CLI and every other client print it: from the
// gateway's table, not Connect-ES's PascalCase names (one of them the American `Canceled`).
function grpcCodeName(code, config) {
  return config.codeNames[code] ?? `code ${code}`;
}

function faultRow(rawCode, config) {
  const known = config.faults[String(rawCode)];
  const [low, high] = config.documentedFaults;
  const row = known ?? (rawCode >= low && rawCode <= high ? config.unknownFault : config.internalFault);
  return { code: rawCode, ...row };
}

function gatewayError(info, code, config) {
  if (!info || info.domain !== config.gatewayDomain) return null;
  return config.gatewayErrors.find((row) => row.reason === info.reason && row.code === code) ?? null;
}

function watchProblem(problem) {
  switch (problem.reason) {
    case "LOG_PUBLISHER_UNAVAILABLE":
      return "Live updates paused: the gateway has no connection to the controller's Log Publisher (LOG_PUBLISHER_UNAVAILABLE).";
    case "WATCH_LAGGED":
      return "Live updates paused: this page fell behind the events (WATCH_LAGGED), so some were missed.";
    default:
      return `Live updates paused: watching failed with ${problem.codeName}${problem.reason ? ` (${problem.reason})` : ""}: ${problem.message}.`;
  }
}

// === the banner, the token, time ===

// Shows `text` unless the banner says it already (with another try's request id): a screen
// reader reads each change of the banner (aria-live), and a page that tries again every few
// seconds would have it read the same news over and over.
function showBanner(text, requestId) {
  if (!page.banner.hidden && page.banner.dataset.text === text) return;
  page.banner.dataset.text = text;
  page.banner.textContent = requestId ? `${text} Request id ${requestId}.` : text;
  page.banner.hidden = false;
}

function hideBanner() {
  page.banner.hidden = true;
  page.banner.textContent = "";
  delete page.banner.dataset.text;
}

function setUpToken() {
  page.tokenForm.addEventListener("submit", (submitted) => {
    submitted.preventDefault();
    bearerToken = page.token.value.trim();
    // The refusal of this token is news, even in the words the last one's had.
    delete page.banner.dataset.text;
    // Cleared, so the browser has nothing to offer to save: the token lives in this tab only.
    page.token.value = "";
    page.tokenState.textContent = bearerToken ? "in use (this tab only)" : "none given";
    // Watch again at once with the new token.
    watching.abort();
  });
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve();
      return;
    }
    const woken = () => { clearTimeout(timer); resolve(); };
    const timer = setTimeout(() => { signal.removeEventListener("abort", woken); resolve(); }, ms);
    signal.addEventListener("abort", woken, { once: true });
  });
}

function aborted(signal) {
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener("abort", resolve, { once: true });
  });
}

// `ms` give or take JITTER, in whole tenths of a second as the banner and the tiles say it, and
// never more than the cap the banner names.
function jittered(ms) {
  return Math.min(Math.round(ms * (1 - JITTER + 2 * JITTER * Math.random()) / 100) * 100, MAX_BACKOFF_MS);
}

// A duration as the CLI prints it (Rust's humantime): "700ms", "1s", "1m 30s".
function cliDuration(ms) {
  const units = [["d", 86400000], ["h", 3600000], ["m", 60000], ["s", 1000], ["ms", 1]];
  const parts = [];
  let rest = ms;
  for (const [unit, size] of units) {
    const count = Math.floor(rest / size);
    if (count > 0) parts.push(`${count}${unit}`);
    rest -= count * size;
  }
  return parts.length > 0 ? parts.join(" ") : "0s";
}

function seconds(ms) {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${(ms / 1000).toFixed(1)}s`;
}

// The time of day in UTC, as the gateway's logs and `taskgate watch` give it.
function clock(date) {
  return `${date.toISOString().slice(11, 23)} UTC`;
}
