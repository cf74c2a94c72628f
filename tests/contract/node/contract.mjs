// A CRM written in another language, integrating from the published schema alone.
//
// It loads config/schema/cascadegw.schema.json in ajv's strict mode, builds requests from the
// schema's own examples, validates every request it sends and every reply and status event it
// receives, and talks to a live gateway over ZeroMQ (DEALER for requests, SUB for events) with
// @msgpack/msgpack. Anything that does not match the schema is a failure.
//
//   node contract.mjs <schema.json> <ingest endpoint> <status endpoint> <tenant>
//
// It sends nothing before a line arrives on stdin: the test writes one once the gateway has
// taken the subscription (subscriptions travel asynchronously; an event published before then
// is never seen). Prints one JSON line with what it checked; exits 1 on the first mismatch.

import { readFileSync } from "node:fs";
import { decode, encode } from "@msgpack/msgpack";
import Ajv2020Module from "ajv/dist/2020.js";
import addFormatsModule from "ajv-formats";
import * as zmq from "zeromq";

const Ajv2020 = Ajv2020Module.default ?? Ajv2020Module;
const addFormats = addFormatsModule.default ?? addFormatsModule;

const [schemaPath, ingest, statusEndpoint, tenant] = process.argv.slice(2);
const schema = JSON.parse(readFileSync(schemaPath, "utf8"));

const ajv = new Ajv2020({ strict: true, allErrors: true });
addFormats(ajv);
ajv.addSchema(schema, "cascadegw");
const validator = (name) => ajv.getSchema(`cascadegw#/$defs/${name}`);
const validate = {
  request: validator("Request"),
  frame: validator("RequestFrame"),
  reply: validator("ReplyFrame"),
  events: validator("StatusEventMessage"),
};

const checked = { requests: 0, replies: 0, events: 0, refusedBySchemaAndGateway: 0 };

function fail(what, value, errors) {
  console.error(JSON.stringify({ failed: what, value, errors }, null, 2));
  process.exit(1);
}

function mustMatch(kind, value) {
  if (!validate[kind](value)) fail(`${kind} does not match the schema`, value, validate[kind].errors);
}

// requests built from the schema's examples, with fresh ids
const stamp = Date.now().toString(36);
const examples = Object.entries(schema.$defs).flatMap(([name, def]) =>
  (def.examples ?? []).map((example) => ({ name, example })),
);
if (examples.length < 5) fail("the schema has too few examples to build requests from", examples);
const requests = examples.map(({ example }) => {
  const request = structuredClone(example);
  request.tenant = tenant;
  if ("id" in request) request.id = `node-${stamp}-${request.id}`;
  if ("recipient_id" in request) request.recipient_id = `node-${stamp}`;
  if (request.recipient) request.recipient.id = `node-${stamp}`;
  return request;
});
// the cancel, event and status examples name the send example's message
const sendId = requests.find((r) => r.op === "send").id;
for (const request of requests) if (request.op !== "send" && "id" in request) request.id = sendId;
// consent first (the default config denies advertising without it), the send, then the ops
// that name the send's message
const byOp = Object.fromEntries(requests.map((r) => [r.op, r]));
const ordered = ["consent", "send", "event", "status", "cancel"].map((op) => byOp[op]);
const send = byOp.send;
for (const request of ordered) {
  mustMatch("request", request);
  checked.requests += 1;
}

const dealer = new zmq.Dealer({ linger: 0 });
dealer.connect(ingest);
const subscriber = new zmq.Subscriber({ linger: 0 });
subscriber.connect(statusEndpoint);
subscriber.subscribe(tenant);

const events = [];
const listening = (async () => {
  for await (const [topic, payload] of subscriber) {
    // topics match by prefix in ZeroMQ: compare the tenant frame exactly
    if (topic.toString() !== tenant) fail("an event of another tenant arrived", topic.toString());
    const message = decode(payload);
    mustMatch("events", message);
    checked.events += message.length;
    events.push(...message);
  }
})();

let correlation = 0;
async function exchange(frame) {
  const id = Buffer.from(`c${++correlation}`);
  await dealer.send([id, encode(frame)]);
  for (;;) {
    const [got, payload] = await dealer.receive();
    if (got.equals(id)) {
      const reply = decode(payload);
      mustMatch("reply", reply);
      checked.replies += 1;
      return reply;
    }
  }
}

async function call(frame) {
  mustMatch("frame", frame);
  return exchange(frame);
}

// the test's word that the gateway has taken the subscription
await new Promise((resolve) => process.stdin.once("data", resolve));
process.stdin.pause();

// one batch with every op, then each op alone
const batch = await call(ordered);
if (!Array.isArray(batch) || batch.length !== ordered.length)
  fail("a batch must get one result per request", batch);
if (batch[0].status !== "ok") fail("the consent example was not recorded", batch[0]);
if (batch[1].status !== "accepted") fail("the send example was not accepted", batch[1]);
const status = await call({ v: 1, op: "status", id: sendId, tenant });
if (status.status !== "ok" || !Array.isArray(status.message?.timeline))
  fail("status must show the timeline", status);
for (const event of status.message.timeline)
  if (Number.isNaN(Date.parse(event.at))) fail("times must parse as dates", event);

// the same id again: duplicate; with a different body: conflict
const again = await call(send);
if (again.status !== "duplicate") fail("a repeated send must be a duplicate", again);
const changed = structuredClone(send);
changed.category = "content";
const conflict = await call(changed);
if (conflict.reason !== "conflict") fail("an id reused with another body must conflict", conflict);

// what the schema refuses, the gateway refuses too (and says why)
const refused = [
  { ...send, v: 2, id: `node-${stamp}-v2` },
  { ...send, id: `node-${stamp}-ts`, send_at: "2026-02-30T09:00:00Z" },
  { ...send, id: `node-${stamp}-tz`, recipient: { ...send.recipient, tz: "Mars/Olympus" } },
  { ...send, id: `node-${stamp}-ch`, channels: ["sms", "sms"] },
  { ...send, id: `node-${stamp}-st`, step_timeout_seconds: { fax: 10 } },
  { ...send, id: `node-${stamp}-co`, content: { link_url: "https://shop.example/" } },
];
for (const request of refused) {
  const schemaSays = validate.request(request);
  const answer = await exchange(request);
  if (schemaSays || answer.reason !== "invalid" || !answer.detail)
    fail("schema and gateway disagree", { request, schemaSays, answer });
  checked.refusedBySchemaAndGateway += 1;
}
// a batch over the limit: the schema refuses it, the gateway answers each request
const overLimit = Array.from({ length: 1001 }, () => byOp.status);
if (validate.frame(overLimit)) fail("the schema must refuse a batch of 1001", overLimit.length);
const overAnswer = await exchange(overLimit);
if (!Array.isArray(overAnswer) || overAnswer.length !== 1001 || overAnswer.some((r) => r.reason !== "invalid"))
  fail("a batch over the limit gets one invalid result per request", overAnswer.length);

// wait (bounded) for the status events the first batch causes: the send accepted, then read
// (the batch's event op reports it opened)
const expected = ["accepted", "read"];
const arrived = () => expected.every((kind) => events.some((e) => e.id === sendId && e.kind === kind));
const deadline = Date.now() + 20000;
while (!arrived() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 50));
if (!arrived()) fail(`status events ${expected} did not all arrive for the message`, events);

console.log(JSON.stringify({ ok: true, ...checked }));
listening.catch(() => {}); // closing the socket ends the loop with an error: expected now
dealer.close();
subscriber.close();
process.exit(0);
