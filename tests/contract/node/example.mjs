// A minimal Node.js CRM for cascadegw: npm install zeromq @msgpack/msgpack
//   node example.mjs tcp://127.0.0.1:5555 tcp://127.0.0.1:5556 demo
import { decode, encode } from "@msgpack/msgpack";
import * as zmq from "zeromq";

const [ingest, statusEndpoint, tenant] = process.argv.slice(2);

// status events: two frames, [tenant, msgpack array of events]; topics match by prefix, so
// compare the tenant frame exactly
const events = new zmq.Subscriber();
events.connect(statusEndpoint);
events.subscribe(tenant);
await new Promise((resolve) => setTimeout(resolve, 200)); // subscriptions travel asynchronously

// requests: a DEALER sends [correlation, msgpack request or array of requests] and gets
// [correlation, msgpack result or array of results] back, once the gateway made it durable
const dealer = new zmq.Dealer();
dealer.connect(ingest);

const request = {
  v: 1,
  op: "send",
  id: `welcome-${Date.now()}`, // the CRM's id: the idempotency key
  tenant,
  recipient: { id: "customer-1", tz: "Europe/Moscow", email: "ann@example.com" },
  category: "service", // service messages need no advertising consent
  content: { email: { subject: "Welcome", text: "Your account is ready." } },
  send_at: new Date().toISOString(), // times are RFC 3339 strings
};
await dealer.send(["c1", encode(request)]);
const [, payload] = await dealer.receive();
const result = decode(payload); // {status: "accepted", id, channels: ["email"]}
console.log(JSON.stringify({ result }));

for await (const [topic, message] of events) {
  if (topic.toString() !== tenant) continue;
  const mine = decode(message).filter((event) => event.id === request.id);
  for (const event of mine) console.log(JSON.stringify({ event }));
  if (mine.some((event) => event.kind === "sent")) break;
}
dealer.close();
events.close();
