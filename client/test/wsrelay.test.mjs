// client/test/wsrelay.test.mjs — unit tests of client/wsrelay.js, run with `node --test client/test/`
// (Node 20+, no npm packages). A fake WebSocket and a fake clock are injected, so every test is
// deterministic: the "server" side is played by the test, frame by frame.

import { test } from "node:test";
import assert from "node:assert/strict";
import { WsRelay, backoffDelay, toBase64, fromBase64, tokenExpiry } from "../wsrelay.js";

// ---------------------------------------------------------------- fakes

/** A manual clock: timers run only when the test advances time. */
class FakeClock {
  constructor() {
    this.t = 1_000_000;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.t + Math.max(0, ms), fn, id });
      return id;
    };
    this.clearTimeout = (id) => this.timers.delete(id);
    this.now = () => this.t;
  }

  /** Runs every timer due within `ms`, in time order, then sets the clock to now + ms. */
  advance(ms) {
    const end = this.t + ms;
    for (;;) {
      let next = null;
      for (const tm of this.timers.values()) {
        if (tm.at <= end && (!next || tm.at < next.at || (tm.at === next.at && tm.id < next.id))) next = tm;
      }
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
    }
    this.t = end;
  }
}

/** Builds a fake WebSocket class that records its instances. */
function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    constructor(url, protocol) {
      this.url = url;
      this.offered = protocol;
      this.protocol = "";
      this.sent = [];
      this.closed = null;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      sockets.push(this);
    }
    send(text) {
      if (this.closed) throw new Error("send on a closed socket");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closed = { code, reason };
    }
    // ---- the server side, driven by the test
    accept(protocol = "wsrelay.v1") {
      this.protocol = protocol;
      this.onopen?.({});
      this.push({ type: "welcome", session: "s" + sockets.length, resumed: false });
    }
    push(obj) {
      this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
    }
    drop(code = 1006, reason = "") {
      this.closed = { code, reason };
      this.onclose?.({ code, reason });
    }
    /** Sent commands with this op, removed from `sent`. */
    take(op) {
      const out = this.sent.filter((m) => m.op === op);
      this.sent = this.sent.filter((m) => m.op !== op);
      return out;
    }
  }
  return { FakeWS, sockets };
}

/** A relay wired to fakes, plus helpers. `randoms` feeds random() in order (then repeats 0.5). */
function setup(opts = {}, randoms = []) {
  const clock = new FakeClock();
  const { FakeWS, sockets } = fakeWebSocket();
  const queue = [...randoms];
  const relay = new WsRelay({
    urls: ["ws://a:1", "ws://b:2"],
    WebSocket: FakeWS,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => (queue.length ? queue.shift() : 0.5),
    pingInterval: 0,
    ...opts,
  });
  const events = [];
  for (const e of ["state", "disconnect", "recovered", "error", "welcome", "refreshed"]) {
    relay.on(e, (...args) => events.push([e, ...args]));
  }
  const last = () => sockets[sockets.length - 1];
  return { relay, clock, sockets, last, events };
}

/** Subscribes on the current socket and answers the subscribe. */
function confirm(ws, channel, reply) {
  const i = ws.sent.findIndex((m) => m.op === "subscribe" && m.channel === channel);
  assert.ok(i >= 0, `a subscribe for ${channel} was sent`);
  const [cmd] = ws.sent.splice(i, 1);
  ws.push({ type: "subscribed", ref: cmd.ref, channel, ...reply });
  return cmd;
}

function msg(channel, offset, epoch, data) {
  return { type: "message", channel, offset, epoch, data };
}

/** A subscription collecting what reaches the application. */
function collector() {
  const got = { messages: [], recovered: [], subscribed: [], errors: [] };
  got.handlers = {
    onMessage: (data, meta) => got.messages.push([data, meta]),
    onRecovered: (ok, info) => got.recovered.push([ok, info]),
    onSubscribed: (info) => got.subscribed.push(info),
    onError: (err) => got.errors.push(err),
  };
  got.data = () => got.messages.map(([d]) => d);
  return got;
}

// ---------------------------------------------------------------- backoff

test("backoffDelay: full jitter in [0, min(cap, base*2^n)]", () => {
  assert.equal(backoffDelay(0, 250, 10000, () => 0), 0);
  assert.equal(backoffDelay(0, 250, 10000, () => 0.999999), 249);
  assert.equal(backoffDelay(3, 250, 10000, () => 0.5), 1000); // ceiling 2000
  assert.equal(backoffDelay(6, 250, 10000, () => 0.5), 5000); // ceiling 10000 (capped from 16000)
  assert.equal(backoffDelay(1000, 250, 10000, () => 0.5), 5000); // no overflow
  // Jittered: different random draws give different delays within the ceiling.
  const seen = new Set();
  for (let i = 0; i < 20; i++) {
    const d = backoffDelay(4, 250, 10000, () => i / 20);
    assert.ok(d >= 0 && d <= 4000, `delay ${d} within [0, 4000]`);
    seen.add(d);
  }
  assert.equal(seen.size, 20);
});

test("reconnect delays grow exponentially, are jittered, capped, and rotate over the URLs", () => {
  const { clock, sockets, last, events } = setup({ minDelay: 100, maxDelay: 1000 },
    [0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.999, 0.25, 0.75]);
  const delays = [];
  for (let i = 0; i < 9; i++) {
    last().drop(1006);
    const ev = events.filter(([e]) => e === "disconnect").at(-1)[1];
    delays.push(ev.delay);
    assert.equal(ev.attempt, i);
    const before = sockets.length;
    clock.advance(ev.delay - 1);
    assert.equal(sockets.length, before, "no reconnect before the delay");
    clock.advance(1);
    assert.equal(sockets.length, before + 1, "reconnect after the delay");
  }
  // ceilings 100, 200, 400, 800, then capped at 1000; the last two draws show the jitter.
  assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999, 250, 750]);
  assert.deepEqual(sockets.map((s) => s.url),
    ["ws://a:1", "ws://b:2", "ws://a:1", "ws://b:2", "ws://a:1", "ws://b:2", "ws://a:1", "ws://b:2", "ws://a:1", "ws://b:2"]);
  assert.ok(sockets.every((s) => s.offered === "wsrelay.v1"));
});

test("no fixed retry delay: many clients reconnecting spread over the window", () => {
  let seed = 42;
  const rng = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const delays = Array.from({ length: 200 }, () => backoffDelay(2, 250, 10000, rng));
  const buckets = new Set(delays.map((d) => Math.floor(d / 100)));
  assert.ok(buckets.size >= 9, `delays spread over [0, 1000): ${buckets.size} buckets of 100 ms`);
});

test("backoff resets once a connection has been stable, not before", () => {
  const { clock, last, events } = setup({ minDelay: 100, maxDelay: 10000, stableAfter: 5000 },
    new Array(20).fill(0.999));
  const lastDelay = () => events.filter(([e]) => e === "disconnect").at(-1)[1];
  last().drop();
  clock.advance(lastDelay().delay);
  last().drop();
  clock.advance(lastDelay().delay);
  last().accept();
  clock.advance(4999); // open, but not stable yet
  last().drop();
  assert.equal(lastDelay().attempt, 2);
  assert.equal(lastDelay().delay, 399);
  clock.advance(lastDelay().delay);
  last().accept();
  clock.advance(5000); // stable
  last().drop();
  assert.equal(lastDelay().attempt, 0);
  assert.equal(lastDelay().delay, 99);
});

// ---------------------------------------------------------------- subscriptions

test("resubscribes every channel with the last offset and epoch seen, without ?session=", () => {
  const { relay, clock, last, events } = setup();
  const chat = collector();
  const news = collector();
  relay.subscribe("chat", chat.handlers);
  relay.subscribe("news", news.handlers);
  const ws1 = last();
  assert.equal(ws1.sent.length, 0, "nothing is sent before the socket opens");
  ws1.accept();
  const first = confirm(ws1, "chat", { offset: 5, epoch: "E1" });
  assert.equal(first.offset, undefined, "first subscribe asks for no recovery");
  confirm(ws1, "news", { offset: 0, epoch: "N1" });
  ws1.push(msg("chat", 6, "E1", "six"));
  ws1.push(msg("chat", 7, "E1", "seven"));
  ws1.push(msg("news", 1, "N1", "n1"));
  assert.deepEqual(chat.data(), ["six", "seven"]);
  assert.deepEqual(chat.messages[1][1], { channel: "chat", offset: 7, epoch: "E1", binary: false });

  ws1.drop(1006);
  assert.equal(relay.state, "connecting");
  clock.advance(10_000);
  const ws2 = last();
  assert.notEqual(ws2, ws1);
  assert.ok(!ws2.url.includes("session"), "the client never passes ?session=");
  ws2.accept();
  const subs = ws2.take("subscribe");
  assert.deepEqual(subs.map(({ channel, offset, epoch }) => ({ channel, offset, epoch })), [
    { channel: "chat", offset: 7, epoch: "E1" },
    { channel: "news", offset: 1, epoch: "N1" },
  ]);
  assert.deepEqual(events.filter(([e]) => e === "state").map(([, s]) => s),
    ["open", "connecting", "open"]);
});

test("a position given at subscribe asks for recovery on the first subscribe", () => {
  const { relay, last } = setup();
  const c = collector();
  relay.subscribe("chat", { ...c.handlers, offset: 41, epoch: "Xy" });
  last().accept();
  const cmd = confirm(last(), "chat", { offset: 43, epoch: "Xy", recovered: true });
  assert.equal(cmd.offset, 41);
  assert.equal(cmd.epoch, "Xy");
  last().push(msg("chat", 42, "Xy", "42"));
  last().push(msg("chat", 43, "Xy", "43"));
  assert.deepEqual(c.data(), ["42", "43"]);
  assert.deepEqual(c.recovered.map(([ok]) => ok), [true]);
});

test("duplicates by offset are dropped; the replay after recovered:true is delivered once", () => {
  const { relay, clock, last } = setup();
  const c = collector();
  const sub = relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 0, epoch: "E" });
  for (let i = 1; i <= 3; i++) last().push(msg("chat", i, "E", `m${i}`));
  last().push(msg("chat", 3, "E", "m3 again")); // live duplicate
  last().push(msg("chat", 2, "E", "m2 again"));
  assert.deepEqual(c.data(), ["m1", "m2", "m3"]);

  last().drop();
  clock.advance(10_000);
  last().accept();
  // The server replays from an older offset (at-least-once) and reports the channel at 5.
  confirm(last(), "chat", { offset: 5, epoch: "E", recovered: true });
  assert.equal(sub.offset, 3, "keeps its own position so the replay is not skipped");
  for (const i of [2, 3, 4, 5]) last().push(msg("chat", i, "E", `m${i}`));
  last().push(msg("chat", 5, "E", "m5 again"));
  last().push(msg("chat", 6, "E", "m6"));
  assert.deepEqual(c.data(), ["m1", "m2", "m3", "m4", "m5", "m6"]);
  assert.deepEqual(c.recovered.map(([ok, info]) => [ok, info.fromOffset, info.offset]), [[true, 3, 5]]);
  assert.equal(sub.offset, 6);
  // Messages without offsets (backend PUBLISH straight into Redis) are always delivered.
  last().push({ type: "message", channel: "chat", data: "from backend" });
  assert.equal(c.data().at(-1), "from backend");
  assert.equal(sub.offset, 6);
});

test("messages before the subscribed reply and for other channels are not delivered", () => {
  const { relay, last } = setup();
  const c = collector();
  relay.subscribe("chat", c.handlers);
  last().accept();
  last().push(msg("chat", 1, "E", "too early"));
  last().push(msg("other", 1, "E", "not ours"));
  confirm(last(), "chat", { offset: 1, epoch: "E" });
  last().push(msg("chat", 2, "E", "ok"));
  assert.deepEqual(c.data(), ["ok"]);
});

test("recovered:false reaches the application (callback and event), live messages continue", () => {
  const { relay, clock, last, events } = setup();
  const c = collector();
  relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 10, epoch: "E1" });
  last().push(msg("chat", 11, "E1", "a"));

  // History trimmed: same epoch, not covered.
  last().drop();
  clock.advance(10_000);
  last().accept();
  confirm(last(), "chat", { offset: 500, epoch: "E1", recovered: false });
  last().push(msg("chat", 501, "E1", "b"));
  last().push(msg("chat", 499, "E1", "old"));

  // Redis restarted empty: new epoch, offsets start over.
  last().drop();
  clock.advance(10_000);
  last().accept();
  const cmd = confirm(last(), "chat", { offset: 0, epoch: "E2", recovered: false });
  assert.equal(cmd.offset, 501);
  assert.equal(cmd.epoch, "E1");
  last().push(msg("chat", 1, "E2", "c"));

  assert.deepEqual(c.data(), ["a", "b", "c"]);
  assert.deepEqual(c.recovered.map(([ok, i]) => [ok, i.reason, i.fromOffset, i.offset]), [
    [false, "not_covered", 11, 500],
    [false, "epoch_changed", 501, 0],
  ]);
  assert.equal(events.filter(([e, ok]) => e === "recovered" && ok === false).length, 2);
  assert.deepEqual(c.subscribed.map((s) => s.recovered), [undefined, false, false]);
});

test("an epoch change on a live connection is reported as recovered:false", () => {
  const { relay, last } = setup();
  const c = collector();
  relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 3, epoch: "E1" });
  last().push(msg("chat", 4, "E1", "a"));
  last().push(msg("chat", 1, "E2", "b"));
  last().push(msg("chat", 2, "E2", "c"));
  assert.deepEqual(c.data(), ["a", "b", "c"]);
  assert.deepEqual(c.recovered.map(([ok, i]) => [ok, i.reason]), [[false, "epoch_changed"]]);
});

test("a gap in offsets makes the client resubscribe from its last offset to fill it", () => {
  const { relay, last } = setup();
  const c = collector();
  relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 0, epoch: "E" });
  last().push(msg("chat", 1, "E", "1"));
  last().push(msg("chat", 4, "E", "4")); // 2 and 3 missing
  last().push(msg("chat", 5, "E", "5")); // in flight before the resync: dropped
  assert.deepEqual(last().take("unsubscribe").map((m) => m.channel), ["chat"]);
  const cmd = confirm(last(), "chat", { offset: 5, epoch: "E", recovered: true });
  assert.equal(cmd.offset, 1);
  for (const i of [2, 3, 4, 5, 6]) last().push(msg("chat", i, "E", String(i)));
  assert.deepEqual(c.data(), ["1", "2", "3", "4", "5", "6"]);

  // A gap the replay cannot fill is reported once, not resynced forever.
  last().push(msg("chat", 9, "E", "9"));
  last().take("unsubscribe");
  confirm(last(), "chat", { offset: 9, epoch: "E", recovered: true });
  last().push(msg("chat", 9, "E", "9"));
  assert.equal(last().take("subscribe").length, 0);
  assert.deepEqual(c.data(), ["1", "2", "3", "4", "5", "6", "9"]);
  assert.deepEqual(c.recovered.map(([ok, i]) => [ok, i.reason ?? null]),
    [[true, null], [true, null], [false, "gap"]]);
});

test("unsubscribe stops delivery and is not renewed on reconnect", () => {
  const { relay, clock, last } = setup();
  const c = collector();
  const sub = relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 0, epoch: "E" });
  sub.unsubscribe();
  const [u] = last().take("unsubscribe");
  assert.equal(u.channel, "chat");
  last().push({ type: "unsubscribed", ref: u.ref, channel: "chat" });
  last().push(msg("chat", 1, "E", "late"));
  assert.deepEqual(c.data(), []);
  last().drop();
  clock.advance(10_000);
  last().accept();
  assert.equal(last().take("subscribe").length, 0);
  // The channel can be subscribed again.
  relay.subscribe("chat", {});
  assert.equal(last().take("subscribe").length, 1);
});

test("a refused subscribe reaches onError and is dropped; subscribing twice throws", () => {
  const { relay, clock, last } = setup();
  const c = collector();
  relay.subscribe("secret", c.handlers);
  assert.throws(() => relay.subscribe("secret", {}), /already subscribed/);
  last().accept();
  const [cmd] = last().take("subscribe");
  last().push({ type: "error", ref: cmd.ref, code: "forbidden", message: "no" });
  assert.equal(c.errors[0].code, "forbidden");
  last().drop();
  clock.advance(10_000);
  last().accept();
  assert.equal(last().take("subscribe").length, 0);
});

test("a subscription the server ends reaches onError, stops delivering and is not renewed", () => {
  const { relay, clock, last } = setup();
  const c = collector();
  relay.subscribe("private:payroll", c.handlers);
  last().accept();
  confirm(last(), "private:payroll", { offset: 0, epoch: "e" });
  last().push({ type: "unsubscribed", channel: "private:payroll", reason: "forbidden" });
  assert.equal(c.errors[0].code, "forbidden");
  last().push(msg("private:payroll", 1, "e", "salaries"));
  assert.deepEqual(c.data(), []);
  last().drop();
  clock.advance(10_000);
  last().accept();
  assert.equal(last().take("subscribe").length, 0);
});

test("subscribe answered with `unavailable` stays live and reports a failed recovery", () => {
  const { relay, clock, last } = setup();
  const c = collector();
  relay.subscribe("chat", c.handlers);
  last().accept();
  confirm(last(), "chat", { offset: 2, epoch: "E" });
  last().drop();
  clock.advance(10_000);
  last().accept();
  const [cmd] = last().take("subscribe");
  last().push({ type: "error", ref: cmd.ref, code: "unavailable", message: "history down" });
  last().push(msg("chat", 7, "E", "live"));
  last().push(msg("chat", 8, "E", "live2"));
  assert.deepEqual(c.data(), ["live", "live2"]);
  assert.equal(last().take("subscribe").length, 0, "no resync loop");
  assert.deepEqual(c.recovered.map(([ok, i]) => [ok, i.reason]), [[false, "unavailable"]]);
});

// ---------------------------------------------------------------- publishing

test("publish resolves on `published` and rejects on `error`", async () => {
  const { relay, last } = setup();
  last().accept();
  const p1 = relay.publish("chat", "hello");
  const p2 = relay.publish("chat", "again");
  const [c1, c2] = last().take("publish");
  assert.deepEqual({ ...c1, ref: 0 }, { op: "publish", channel: "chat", data: "hello", ref: 0 });
  last().push({ type: "published", ref: c1.ref, channel: "chat", offset: 60, epoch: "E" });
  last().push({ type: "error", ref: c2.ref, code: "rate_limited", message: "slow down" });
  assert.deepEqual(await p1, { channel: "chat", offset: 60, epoch: "E" });
  await assert.rejects(p2, (e) => e.code === "rate_limited" && e.message === "slow down");
});

test("publishes wait in a bounded queue while disconnected and are sent after reconnecting", async () => {
  const { relay, clock, last } = setup({ maxQueue: 3 });
  const ps = ["a", "b", "c"].map((d) => relay.publish("chat", d));
  await assert.rejects(relay.publish("chat", "d"), (e) => e.code === "queue_full");
  assert.equal(last().sent.length, 0);
  last().drop(); // the first try fails: they keep waiting
  clock.advance(10_000);
  const sub = relay.subscribe("chat", {});
  last().accept();
  // Subscriptions first, then the queued publishes in order.
  assert.deepEqual(last().sent.map((m) => m.op), ["subscribe", "publish", "publish", "publish"]);
  const pubs = last().take("publish");
  assert.deepEqual(pubs.map((m) => m.data), ["a", "b", "c"]);
  pubs.forEach((m, i) => last().push({ type: "published", ref: m.ref, channel: "chat", offset: i + 1 }));
  assert.deepEqual((await Promise.all(ps)).map((r) => r.offset), [1, 2, 3]);
  // The queue has room again.
  last().drop();
  const more = Array.from({ length: 3 }, (_, i) => relay.publish("chat", `x${i}`));
  await assert.rejects(relay.publish("chat", "overflow"), (e) => e.code === "queue_full");
  relay.close();
  for (const p of more) await assert.rejects(p, (e) => e.code === "closed");
  assert.equal(sub.active, false);
});

test("a publish in flight when the connection drops is rejected as `disconnected`, not resent", async () => {
  const { relay, clock, last } = setup();
  last().accept();
  const p = relay.publish("chat", "maybe");
  assert.equal(last().take("publish").length, 1);
  last().drop();
  await assert.rejects(p, (e) => e.code === "disconnected");
  clock.advance(10_000);
  last().accept();
  assert.equal(last().take("publish").length, 0);
});

test("binary round trip: publish as data_b64, data_b64 delivered as Uint8Array", async () => {
  const { relay, last } = setup();
  const c = collector();
  relay.subscribe("bin", c.handlers);
  last().accept();
  confirm(last(), "bin", { offset: 0, epoch: "E" });
  const bytes = new Uint8Array([0, 1, 2, 255]);
  const p = relay.publish("bin", bytes);
  const [cmd] = last().take("publish");
  assert.equal(cmd.data_b64, "AAEC/w==");
  assert.equal(cmd.data, undefined);
  last().push({ type: "published", ref: cmd.ref, channel: "bin", offset: 1, epoch: "E" });
  await p;
  last().push({ type: "message", channel: "bin", offset: 1, epoch: "E", data_b64: cmd.data_b64 });
  const [data, meta] = c.messages[0];
  assert.ok(data instanceof Uint8Array);
  assert.deepEqual([...data], [0, 1, 2, 255]);
  assert.equal(meta.binary, true);
  // ArrayBuffer and other views, and a large payload, survive too.
  relay.publish("bin", new Uint16Array([0x0102]).buffer);
  relay.publish("bin", new DataView(new Uint8Array([9, 8, 7]).buffer, 1, 2));
  const big = Uint8Array.from({ length: 200_000 }, (_, i) => (i * 31) & 0xff);
  relay.publish("bin", big);
  const [ab, dv, bg] = last().take("publish");
  assert.deepEqual([...fromBase64(ab.data_b64)], [2, 1]);
  assert.deepEqual([...fromBase64(dv.data_b64)], [8, 7]);
  assert.deepEqual(fromBase64(bg.data_b64), big);
  assert.equal(toBase64(new Uint8Array()), "");
  await assert.rejects(relay.publish("bin", 42), TypeError);
});

// ---------------------------------------------------------------- connection health

test("a server that does not accept wsrelay.v1 is dropped before anything is sent", () => {
  const { relay, clock, last, events } = setup();
  relay.subscribe("chat", {});
  const ws = last();
  ws.accept(""); // raw protocol: anything sent now would be published as text
  assert.equal(ws.sent.length, 0);
  assert.ok(ws.closed);
  assert.ok(events.some(([e, err]) => e === "error" && err.code === "protocol"));
  clock.advance(10_000);
  assert.notEqual(last(), ws);
});

test("connect timeout moves on to the next URL", () => {
  const { clock, sockets } = setup({ connectTimeout: 3000 });
  clock.advance(2999);
  assert.equal(sockets.length, 1);
  clock.advance(1);
  assert.ok(sockets[0].closed);
  clock.advance(10_000);
  assert.equal(sockets[1].url, "ws://b:2");
});

test("heartbeat: pings a quiet server and replaces a dead connection", () => {
  const { clock, sockets, last } = setup({ pingInterval: 1000, pingTimeout: 500 });
  last().accept();
  clock.advance(999);
  assert.equal(last().take("ping").length, 0);
  clock.advance(1);
  const [ping] = last().take("ping");
  assert.ok(ping);
  last().push({ type: "pong", ref: ping.ref });
  clock.advance(999);
  assert.equal(last().take("ping").length, 0, "the pong counts as traffic");
  clock.advance(1);
  assert.equal(last().take("ping").length, 1);
  clock.advance(499);
  assert.equal(last().closed, null);
  clock.advance(1);
  assert.ok(sockets[0].closed, "no answer: the connection is dropped");
  clock.advance(10_000);
  assert.equal(sockets.length, 2);
});

test("close() stops reconnecting and rejects what waits", async () => {
  const { relay, clock, sockets, events } = setup();
  const p = relay.publish("chat", "x");
  relay.close();
  await assert.rejects(p, (e) => e.code === "closed");
  await assert.rejects(relay.publish("chat", "y"), (e) => e.code === "closed");
  assert.throws(() => relay.subscribe("chat", {}), /closed/);
  clock.advance(100_000);
  assert.equal(sockets.length, 1);
  assert.equal(relay.state, "closed");
  assert.equal(events.filter(([e]) => e === "state").at(-1)[1], "closed");
});

test("a listener that subscribes on `open` is subscribed once", () => {
  const { relay, last } = setup();
  relay.on("state", (s) => {
    if (s === "open" && !relay._subs.has("x")) relay.subscribe("x", {});
  });
  relay.subscribe("y", {});
  last().accept();
  assert.deepEqual(last().take("subscribe").map((m) => m.channel), ["y", "x"]);
});

// ---------------------------------------------------------------- presence, history, tokens

/** A JWT-shaped token with `exp` (seconds); the signature is not checked by the client. */
function fakeToken(exp, sub = "u42") {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp })}.c2ln`;
}

/** Lets pending promise callbacks (an async getToken) run. */
const settle = () => new Promise((r) => setImmediate(r));

test("tokenExpiry reads exp from a JWT, and null from anything else", () => {
  assert.equal(tokenExpiry(fakeToken(1_700_000_123)), 1_700_000_123);
  assert.equal(tokenExpiry("not-a-token"), null);
  assert.equal(tokenExpiry(undefined), null);
});

test("presence, presenceStats and history are requests answered by ref, queued until open", async () => {
  const { relay, last } = setup();
  const p = relay.presence("room");
  const st = relay.presenceStats("room");
  const h = relay.history("room", { limit: 2, since: { offset: 4, epoch: "E" } });
  const ws = last();
  assert.equal(ws.sent.length, 0, "nothing before the socket opens");
  ws.accept();
  const [pr] = ws.take("presence");
  const [sr] = ws.take("presence_stats");
  const [hr] = ws.take("history");
  assert.deepEqual({ ...hr, ref: 0 }, { op: "history", channel: "room", limit: 2, since: { offset: 4, epoch: "E" }, ref: 0 });
  ws.push({ type: "presence", ref: pr.ref, channel: "room", clients: [{ client: "n-0-1", user: "u", info: { n: 1 } }] });
  ws.push({ type: "presence_stats", ref: sr.ref, channel: "room", clients: 3, users: 2 });
  ws.push({ type: "history", ref: hr.ref, channel: "room", offset: 6, epoch: "E", more: false, recovered: true,
    messages: [{ type: "message", channel: "room", offset: 5, epoch: "E", data: "five" },
      { type: "message", channel: "room", offset: 6, epoch: "E", data_b64: "AAE=" }] });
  assert.deepEqual(await p, { channel: "room", clients: [{ client: "n-0-1", user: "u", info: { n: 1 } }] });
  assert.deepEqual(await st, { channel: "room", clients: 3, users: 2 });
  const got = await h;
  assert.equal(got.recovered, true);
  assert.equal(got.offset, 6);
  assert.deepEqual(got.messages.map((m) => [m.offset, m.binary]), [[5, false], [6, true]]);
  assert.equal(got.messages[0].data, "five");
  assert.deepEqual([...got.messages[1].data], [0, 1]);
  // A refusal rejects with the server's code.
  const off = relay.presence("quiet");
  const [q] = ws.take("presence");
  ws.push({ type: "error", ref: q.ref, code: "not_enabled", message: "no presence" });
  await assert.rejects(off, (e) => e.code === "not_enabled");
});

test("join and leave events reach the subscription's handlers and the relay's listeners", () => {
  const { relay, clock, last } = setup();
  const joins = [];
  const leaves = [];
  const all = [];
  relay.on("join", (p) => all.push(["join", p.client]));
  relay.on("leave", (p) => all.push(["leave", p.client]));
  relay.subscribe("room", { info: { name: "Ada" }, onJoin: (p) => joins.push(p), onLeave: (p) => leaves.push(p) });
  const ws = last();
  ws.accept();
  const sent = confirm(ws, "room", { offset: 0, epoch: "E" });
  assert.deepEqual(sent.info, { name: "Ada" }, "info goes with the subscribe");
  ws.push({ type: "join", channel: "room", client: "n-0-2", user: "u", info: { name: "Bo" } });
  ws.push({ type: "leave", channel: "room", client: "n-0-2", user: "u", info: { name: "Bo" } });
  ws.push({ type: "join", channel: "elsewhere", client: "n-0-3" });
  assert.deepEqual(joins, [{ channel: "room", client: "n-0-2", user: "u", info: { name: "Bo" } }]);
  assert.equal(leaves.length, 1);
  assert.deepEqual(all, [["join", "n-0-2"], ["leave", "n-0-2"]]);
  // The info is sent again on every resubscribe.
  ws.drop();
  clock.advance(10_000);
  last().accept();
  assert.deepEqual(confirm(last(), "room", { offset: 0, epoch: "E" }).info, { name: "Ada" });
});

test("getToken: the token goes in a connect command, and subscribes wait for the welcome", async () => {
  const { relay, clock, last } = setup({ getToken: async () => fakeToken(clock.now() / 1000 + 3600) });
  relay.subscribe("room", {});
  const ws = last();
  ws.protocol = "wsrelay.v1";
  ws.onopen({});
  await settle();
  const [connect] = ws.take("connect");
  assert.ok(connect.token.split(".").length === 3, "a token");
  assert.equal(ws.take("subscribe").length, 0, "nothing else before the welcome");
  ws.push({ type: "welcome", ref: connect.ref, session: "s", client: "n-0-9", resumed: false });
  assert.equal(relay.clientId, "n-0-9");
  assert.equal(relay.state, "open");
  assert.equal(ws.take("subscribe").length, 1);
});

test("getToken: refreshed before expiry, again after each refresh; a failed refresh is retried", async () => {
  let n = 0;
  const { relay, clock, last, events } = setup({
    refreshBefore: 10_000,
    getToken: async () => {
      n++;
      return fakeToken(Math.floor(clock.now() / 1000) + 60);
    },
  });
  const ws = last();
  ws.protocol = "wsrelay.v1";
  ws.onopen({});
  await settle();
  const [connect] = ws.take("connect");
  ws.push({ type: "welcome", ref: connect.ref, session: "s", client: "c" });
  assert.equal(n, 1);
  clock.advance(49_000);
  await settle();
  assert.equal(ws.take("refresh").length, 0, "not before exp - refreshBefore");
  clock.advance(1_000);
  await settle();
  const [r1] = ws.take("refresh");
  assert.ok(r1, "refreshed 10 s before exp");
  assert.equal(n, 2);
  // Refused: retried a second later.
  ws.push({ type: "error", ref: r1.ref, code: "unauthorized", message: "bad" });
  assert.ok(events.some(([e, err]) => e === "error" && err.code === "unauthorized"));
  clock.advance(1_000);
  await settle();
  const [r2] = ws.take("refresh");
  assert.ok(r2);
  ws.push({ type: "refreshed", ref: r2.ref, expires: 123 });
  assert.ok(events.some(([e, info]) => e === "refreshed" && info.expires === 123));
  // The new token also lives 60 s: the next refresh 50 s later.
  clock.advance(49_000);
  await settle();
  assert.equal(ws.take("refresh").length, 0);
  clock.advance(1_000);
  await settle();
  assert.equal(ws.take("refresh").length, 1);
  relay.close();
});

test("getToken: a short-lived token is refreshed halfway; a failing getToken drops and retries", async () => {
  let fail = true;
  const { clock, sockets, last, events } = setup({
    getToken: async () => {
      if (fail) throw new Error("backend down");
      return fakeToken(Math.floor(clock.now() / 1000) + 4);
    },
  });
  let ws = last();
  ws.protocol = "wsrelay.v1";
  ws.onopen({});
  await settle();
  assert.ok(ws.closed, "no token: dropped");
  assert.ok(events.some(([e, err]) => e === "error" && err.code === "token"));
  fail = false;
  clock.advance(10_000);
  assert.equal(sockets.length, 2);
  ws = last();
  ws.protocol = "wsrelay.v1";
  ws.onopen({});
  await settle();
  const [connect] = ws.take("connect");
  ws.push({ type: "welcome", ref: connect.ref, session: "s", client: "c" });
  clock.advance(1_999);
  await settle();
  assert.equal(ws.take("refresh").length, 0);
  clock.advance(1);
  await settle();
  assert.equal(ws.take("refresh").length, 1, "halfway through a 4 s token");
});

test("getToken with a server that needs no token: its welcome makes the connection usable", async () => {
  const { relay, last } = setup({ getToken: async () => fakeToken(2_000_000_000) });
  relay.subscribe("room", {});
  const ws = last();
  ws.accept(); // the server welcomes at once, unasked
  await settle();
  assert.equal(relay.state, "open");
  assert.equal(ws.take("connect").length, 0, "no connect once welcomed");
  assert.equal(ws.take("subscribe").length, 1);
});
