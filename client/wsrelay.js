// client/wsrelay.js — the browser client of wsrelay: one dependency-free ES module (no build step)
// speaking the `wsrelay.v1` envelope protocol (README, "Envelope protocol"). It owns reconnecting
// (exponential backoff with full jitter, rotating over the given URLs), resubscribing with the last
// offset and epoch seen on every channel, dropping duplicates by offset, telling the application
// when recovery failed, and queueing publishes while disconnected. It also exposes presence
// (who is on a channel, join and leave events), history on demand, and token authentication
// with refresh before expiry. The server serves it at `GET /wsrelay.js`.
//
// Example:
//
//   import { WsRelay } from "/wsrelay.js";
//
//   const relay = new WsRelay({
//     urls: ["ws://host-a:9000", "ws://host-b:9000"], // tried in rotation on reconnect
//     minDelay: 250, maxDelay: 10000,                  // backoff: random in [0, min(max, min*2^n)]
//   });
//   relay.on("state", (s) => console.log("connection:", s)); // "connecting" | "open" | "closed"
//
//   const sub = relay.subscribe("chat", {
//     onMessage(data, meta) {            // data: string, or Uint8Array for binary payloads
//       console.log(meta.channel, meta.offset, data);
//     },
//     onRecovered(ok, info) {            // after a reconnect: were the missed messages replayed?
//       if (!ok) reloadChatFromDatabase(); // history no longer covers the gap: reload state
//     },
//   });
//
//   await relay.publish("chat", "hello");              // resolves with {channel, offset, epoch}
//   await relay.publish("chat", new Uint8Array([0, 1])); // binary, sent as data_b64
//   sub.unsubscribe();
//   relay.close();
//
// With tokens, presence and history (the server started with --token-secret and
// --join-leave 'room:*'):
//
//   const relay = new WsRelay({
//     urls: ["wss://rt.example.com"],
//     getToken: () => fetch("/api/wsrelay-token").then((r) => r.text()), // called to connect and
//   });                                                                  // again before expiry
//   relay.subscribe("room:1", {
//     info: { name: "Ada" },                       // what presence lists with this subscription
//     onJoin(p) { console.log("joined:", p.user, p.info); },  // p = {channel, client, user, info}
//     onLeave(p) { console.log("left:", p.client); },
//   });
//   const { clients } = await relay.presence("room:1");      // [{client, user, info}, ...]
//   const { messages } = await relay.history("room:1", { limit: 50 }); // the newest 50
//
// API
//
// new WsRelay(options)
//   urls            string | string[]   ws:// URLs; the first is tried first, then the next one on
//                                       every reconnect, in rotation. (Alias: `url`.)
//   minDelay        250                 ms, base of the reconnect backoff
//   maxDelay        10000               ms, cap of the reconnect backoff
//   stableAfter     5000                ms a connection must stay open before the backoff resets
//   connectTimeout  10000               ms allowed for the WebSocket to open; then the next URL
//   pingInterval    20000               ms of silence from the server before the client sends
//                                       {"op":"ping"}; 0 disables the heartbeat
//   pingTimeout     10000               ms to wait for any frame after such a ping before the
//                                       connection is considered dead and replaced
//   maxQueue        1000                publishes (and presence/history requests) queued while
//                                       disconnected; more are rejected with code "queue_full"
//   getToken        none                () => token or Promise<token>: a JWT for the server's
//                                       --token-secret. Called before every connection (sent in
//                                       a `connect` command, never in the URL) and again before
//                                       the token expires (sent as `refresh`), so the server never
//                                       closes the connection for an expired token (4401). If it
//                                       throws, the connection is dropped and retried (backoff).
//   refreshBefore   10000               ms before the token's `exp` to refresh it (for tokens that
//                                       live less than twice that: halfway through)
//   WebSocket, random, setTimeout, clearTimeout, now
//                                       injectable for tests (default: the globals, Math.random,
//                                       Date.now)
//   The constructor starts connecting at once.
//
// relay.subscribe(channel, handlers?) -> Subscription
//   handlers.onMessage(data, meta)      meta = {channel, offset, epoch, binary}; offset/epoch are
//                                       undefined when the channel keeps no history
//   handlers.onSubscribed(info)         every time the server confirms the subscription (also after
//                                       each reconnect): {channel, offset, epoch, recovered}
//   handlers.onRecovered(ok, info)      after a subscribe that asked for recovery (every reconnect):
//                                       ok=false means messages may have been missed (history
//                                       trimmed or expired, epoch changed, history unreachable, or
//                                       a gap that could not be replayed): reload from your source
//                                       of truth. info = {channel, offset, epoch, fromOffset,
//                                       fromEpoch, reason} (reason only when ok is false:
//                                       "not_covered", "epoch_changed", "unavailable", "gap")
//   handlers.onError(err)               the server refused the subscription (err.code: "forbidden",
//                                       "bad_channel", "too_many_channels", ...), or ended it later
//                                       (an unsolicited `unsubscribed` with a reason); it is dropped
//   handlers.offset, handlers.epoch     optional starting position (e.g. persisted by the app):
//                                       the first subscribe then already asks for recovery
//   handlers.info                       any JSON value: what the channel's presence lists with this
//                                       subscription (sent with every subscribe)
//   handlers.onJoin(p), onLeave(p)      a subscription joined or left the channel (channels with
//                                       --join-leave): p = {channel, client, user, info}; the
//                                       client's own join too. At most once: after a reconnect,
//                                       read relay.presence() for the exact list
//   Subscribing twice to the same channel throws; unsubscribe first.
//   Subscription: {channel, offset, epoch, active, unsubscribe()}; offset/epoch are the position of
//   the last message delivered (what the next reconnect asks for).
//
// relay.publish(channel, data) -> Promise<{channel, offset, epoch}>
//   data: string (sent as "data"), or Uint8Array / ArrayBuffer / any ArrayBufferView (sent as
//   "data_b64"). Resolves on the server's {"type":"published"}; rejects with an Error whose `code`
//   is the server's error code ("refused", "rate_limited", "forbidden", ...), or
//   "queue_full" (more than maxQueue publishes waiting for a connection), "disconnected" (the
//   connection dropped after the publish was sent and before it was acknowledged: it may or may
//   not have been published; it is not resent, to avoid duplicates), or "closed" (relay.close()).
//   While disconnected, publishes wait in the queue and are sent, in order, after reconnecting.
//
// relay.presence(channel) -> Promise<{channel, clients: [{client, user, info}]}>
// relay.presenceStats(channel) -> Promise<{channel, clients, users}>
//   Who is subscribed (channels with presence), on every node. Rejects with the server's code
//   ("not_enabled", "forbidden", ...). Waits for a connection like publish.
//
// relay.history(channel, {limit, since}) -> Promise<{channel, offset, epoch, messages, more,
//   recovered}>
//   Stored messages without subscribing: the newest `limit`, or (since = {offset, epoch}) those
//   after a position (recovered=false: the history no longer has them, or the epoch changed).
//   messages: [{data, offset, epoch, binary}], oldest first; more=true: ask again from the last.
//
// relay.on(event, fn) -> () => void (removes the listener);  relay.off(event, fn)
//   "state"       (state)          "connecting" | "open" | "closed"
//   "open"        ({url})          a connection opened (subscriptions are being renewed)
//   "welcome"     ({session, resumed, url})
//   "disconnect"  ({url, code, reason, delay, attempt})  a connection ended; the next try is in
//                                  `delay` ms
//   "recovered"   (ok, info)       same as handlers.onRecovered, for every channel
//   "message"     (data, meta)     every delivered message, after duplicate filtering
//   "error"       (err)            protocol errors not tied to a request, and handler exceptions
//   "join", "leave" (p)            as handlers.onJoin/onLeave, for every channel
//   "refreshed"   ({expires})      the token was refreshed
//
// relay.state  "connecting" | "open" | "closed";  relay.url  the URL of the current connection;
// relay.session  the session id of the current connection (not used for resuming: the client
// tracks offsets itself and never passes ?session=).
// relay.clientId  this connection's id, as presence lists it (changes on every reconnect).
// relay.close()  closes for good: no reconnect; queued and unacknowledged publishes are rejected.
//
// Offsets. Every message of a channel with history carries an increasing, gapless offset and an
// epoch. The client remembers the last one it delivered per channel; on every (re)connect it
// subscribes with {offset, epoch} so the server replays exactly what was missed. A message whose
// offset is <= the last delivered one in the same epoch is a duplicate and is dropped. A message
// that skips offsets (same epoch) makes the client resubscribe from its last offset to fill the
// gap (once per position; if that does not help, the gap is reported as onRecovered(false)).

const PROTOCOL = "wsrelay.v1";

/** The `exp` claim (seconds) of a JWT, or null. Not verified: only to know when to refresh. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "===".slice((part.length + 3) % 4))).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/** Error with the server's (or the client's) error `code`. */
export class WsRelayError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.name = "WsRelayError";
    this.code = code;
    if (details !== undefined) this.details = details;
  }
}

/** Backoff delay for attempt `n` (0-based): full jitter in [0, min(maxDelay, minDelay * 2^n)]. */
export function backoffDelay(n, minDelay, maxDelay, random = Math.random) {
  const ceiling = Math.min(maxDelay, minDelay * Math.pow(2, Math.min(n, 52)));
  return Math.floor(random() * ceiling);
}

/** Bytes (Uint8Array, ArrayBuffer or any view) → base64. */
export function toBase64(data) {
  const bytes = toBytes(data);
  let bin = "";
  const CHUNK = 0x8000;
  for (let i = 0; i < bytes.length; i += CHUNK) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + CHUNK));
  }
  return btoa(bin);
}

/** base64 → Uint8Array. */
export function fromBase64(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function toBytes(data) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError("binary data must be a Uint8Array, an ArrayBuffer or an ArrayBufferView");
}

export class WsRelay {
  constructor(options = {}) {
    const urls = options.urls ?? options.url;
    this._urls = (Array.isArray(urls) ? urls : [urls]).filter((u) => typeof u === "string" && u);
    if (this._urls.length === 0) throw new TypeError("WsRelay: `urls` must name at least one ws:// URL");
    this._minDelay = num(options.minDelay, 250);
    this._maxDelay = Math.max(this._minDelay, num(options.maxDelay, 10000));
    this._stableAfter = num(options.stableAfter, 5000);
    this._connectTimeout = num(options.connectTimeout, 10000);
    this._pingInterval = num(options.pingInterval, 20000);
    this._pingTimeout = num(options.pingTimeout, 10000);
    this._maxQueue = num(options.maxQueue, 1000);
    this._getToken = typeof options.getToken === "function" ? options.getToken : null;
    this._refreshBefore = num(options.refreshBefore, 10000);
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") throw new TypeError("WsRelay: no WebSocket implementation");
    this._random = options.random ?? Math.random;
    this._setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    this._now = options.now ?? (() => Date.now());

    this.state = "connecting";
    this.url = null;
    this.session = null;
    this.clientId = null;

    this._listeners = new Map(); // event → Set<fn>
    this._subs = new Map(); // channel → Sub
    this._pending = new Map(); // ref → {kind, sub?, resolve?, reject?}
    this._queue = []; // publishes waiting for a connection: {msg, resolve, reject}
    this._nextRef = 1;
    this._ws = null;
    this._wsOpen = false; // this._ws is open and speaks wsrelay.v1
    this._urlIndex = -1;
    this._attempt = 0; // consecutive connections that did not become stable
    this._reconnectTimer = null;
    this._connectTimer = null;
    this._stableTimer = null;
    this._pingTimer = null;
    this._pingSentAt = 0;
    this._lastRx = 0;
    this._refreshTimer = null;
    this._token = null; // the token of the current connection
    this._closed = false;

    this._connect();
  }

  // ---------------------------------------------------------------- public API

  subscribe(channel, handlers = {}) {
    if (this._closed) throw new WsRelayError("closed", "WsRelay is closed");
    if (typeof channel !== "string" || channel === "") throw new TypeError("channel must be a non-empty string");
    if (this._subs.has(channel)) throw new WsRelayError("already_subscribed", `already subscribed to ${JSON.stringify(channel)}`);
    const sub = {
      channel,
      handlers,
      offset: typeof handlers.offset === "number" ? handlers.offset : null,
      epoch: typeof handlers.epoch === "string" ? handlers.epoch : null,
      active: false, // confirmed by the server on the current connection
      ref: null, // ref of the subscribe in flight
      resyncedAt: null, // offset from which the last gap resync started
    };
    this._subs.set(channel, sub);
    if (this._isOpen()) this._sendSubscribe(sub);
    const relay = this;
    return {
      channel,
      get offset() { return sub.offset; },
      get epoch() { return sub.epoch; },
      get active() { return sub.active; },
      unsubscribe() { relay._unsubscribe(sub); },
    };
  }

  publish(channel, data) {
    const msg = { op: "publish", channel };
    try {
      if (typeof data === "string") msg.data = data;
      else msg.data_b64 = toBase64(data);
    } catch (e) {
      return Promise.reject(e);
    }
    return this._request(msg, (m) => ({ channel: m.channel, offset: m.offset, epoch: m.epoch }));
  }

  presence(channel) {
    return this._request({ op: "presence", channel }, (m) => ({ channel: m.channel, clients: m.clients || [] }));
  }

  presenceStats(channel) {
    return this._request({ op: "presence_stats", channel },
      (m) => ({ channel: m.channel, clients: m.clients, users: m.users }));
  }

  history(channel, { limit, since } = {}) {
    const msg = { op: "history", channel };
    if (typeof limit === "number") msg.limit = limit;
    if (since) msg.since = { offset: since.offset, epoch: since.epoch };
    return this._request(msg, (m) => ({
      channel: m.channel, offset: m.offset, epoch: m.epoch, more: !!m.more, recovered: m.recovered,
      messages: (m.messages || []).map((x) => {
        const binary = typeof x.data_b64 === "string";
        return { data: binary ? fromBase64(x.data_b64) : x.data, offset: x.offset, epoch: x.epoch, binary };
      }),
    }));
  }

  /** Sends a command answered by one reply (`map` turns it into the result), now or once open. */
  _request(msg, map) {
    return new Promise((resolve, reject) => {
      if (this._closed) return reject(new WsRelayError("closed", "WsRelay is closed"));
      if (typeof msg.channel !== "string" || msg.channel === "") return reject(new TypeError("channel must be a non-empty string"));
      const item = { msg, resolve: (m) => resolve(map(m)), reject };
      if (this._isOpen()) return this._sendRequest(item);
      if (this._queue.length >= this._maxQueue) {
        return reject(new WsRelayError("queue_full", `${this._queue.length} requests already wait for a connection`));
      }
      this._queue.push(item);
    });
  }

  on(event, fn) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
  }

  close() {
    if (this._closed) return;
    this._closed = true;
    this._clearTimers();
    this._clear("_reconnectTimer");
    const ws = this._ws;
    this._ws = null;
    this._wsOpen = false;
    if (ws) {
      detach(ws);
      try { ws.close(1000, "client closed"); } catch { /* already closed */ }
    }
    const err = () => new WsRelayError("closed", "WsRelay was closed");
    for (const p of this._pending.values()) if (p.reject) p.reject(err());
    this._pending.clear();
    for (const item of this._queue.splice(0)) item.reject(err());
    for (const sub of this._subs.values()) sub.active = false;
    this._setState("closed");
  }

  // ---------------------------------------------------------------- connection

  _connect() {
    if (this._closed) return;
    this._reconnectTimer = null;
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    const url = this._urls[this._urlIndex];
    this.url = url;
    this.session = null;
    this._setState("connecting");
    let ws;
    try {
      ws = new this._WebSocket(url, PROTOCOL);
    } catch (e) {
      // e.g. a malformed URL: count it as a failed attempt and go on with the next URL.
      this._emit("error", e);
      this._scheduleReconnect({ url, code: 1006, reason: String(e && e.message) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onMessage(ws, ev);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {}; // a close event always follows
    if (this._connectTimeout > 0) {
      this._connectTimer = this._setTimeout(() => {
        this._connectTimer = null;
        if (this._ws === ws) this._drop(ws, 4000, "connect timeout");
      }, this._connectTimeout);
    }
  }

  _onOpen(ws) {
    if (this._ws !== ws) return;
    this._clear("_connectTimer");
    if (ws.protocol !== PROTOCOL) {
      // The server did not accept wsrelay.v1: anything sent now would be published as raw text.
      this._emit("error", new WsRelayError("protocol", `server at ${this.url} did not accept ${PROTOCOL}`));
      this._drop(ws, 1002, "wsrelay.v1 not accepted");
      return;
    }
    this._lastRx = this._now();
    this._pingSentAt = 0;
    if (this._stableAfter > 0) {
      this._stableTimer = this._setTimeout(() => {
        this._stableTimer = null;
        this._attempt = 0;
      }, this._stableAfter);
    } else {
      this._attempt = 0;
    }
    this._schedulePing(this._pingInterval);
    if (this._getToken) {
      this._authenticate(ws);
      return;
    }
    this._ready();
  }

  /** The connection is usable: renew subscriptions and send what waited. */
  _ready() {
    this._wsOpen = true;
    // Renew every subscription (with the last position seen) and send what waited, before telling
    // anyone: a listener that subscribes or publishes now is sent after these.
    for (const sub of this._subs.values()) {
      if (!sub.active && sub.ref === null) this._sendSubscribe(sub);
    }
    for (const item of this._queue.splice(0)) this._sendRequest(item);
    this._setState("open");
    this._emit("open", { url: this.url });
  }

  /** Gets a token and sends it in a `connect` command; the welcome that answers makes it ready. */
  async _authenticate(ws) {
    let token;
    try {
      token = await this._getToken();
      if (typeof token !== "string" || token === "") throw new TypeError("getToken() must return a token string");
    } catch (e) {
      if (this._ws !== ws) return;
      this._emit("error", new WsRelayError("token", `getToken failed: ${e && e.message}`));
      this._drop(ws, 4002, "no token");
      return;
    }
    // Gone meanwhile, or the server needs no token (it welcomed us already).
    if (this._ws !== ws || this._wsOpen) return;
    this._token = token;
    const ref = this._ref();
    this._pending.set(ref, { kind: "connect" });
    this._send({ op: "connect", token, ref });
  }

  /** Refreshes the token `refreshBefore` ms before it expires (halfway for short-lived ones). */
  _scheduleRefresh() {
    this._clear("_refreshTimer");
    const exp = this._getToken && this._token ? tokenExpiry(this._token) : null;
    if (exp === null) return;
    const left = exp * 1000 - this._now();
    const delay = left > 2 * this._refreshBefore ? left - this._refreshBefore : Math.max(0, left / 2);
    this._refreshTimer = this._setTimeout(() => this._refresh(), delay);
  }

  async _refresh() {
    this._refreshTimer = null;
    const ws = this._ws;
    if (!ws || !this._isOpen()) return;
    let token;
    try {
      token = await this._getToken();
    } catch (e) {
      this._emit("error", new WsRelayError("token", `getToken failed: ${e && e.message}`));
      return this._retryRefresh(ws);
    }
    if (this._ws !== ws || !this._isOpen()) return;
    const ref = this._ref();
    this._pending.set(ref, { kind: "refresh", token });
    this._send({ op: "refresh", token, ref });
  }

  /** A refresh failed: try again in a second while the token lasts (the server closes at expiry
   *  with 4401 otherwise, and the reconnect gets a new token). */
  _retryRefresh(ws) {
    if (this._ws !== ws || this._refreshTimer !== null) return;
    this._refreshTimer = this._setTimeout(() => this._refresh(), 1000);
  }

  _onClose(ws, code, reason) {
    if (this._ws !== ws) return;
    this._lost({ url: this.url, code, reason });
  }

  /** Closes `ws` on our side (dead, timed out, wrong protocol) and reconnects. */
  _drop(ws, code, reason) {
    detach(ws);
    try { ws.close(code >= 4000 || code === 1000 ? code : 4000, reason); } catch { /* ignore */ }
    this._lost({ url: this.url, code, reason });
  }

  _lost(info) {
    this._ws = null;
    this._wsOpen = false;
    this._clearTimers();
    for (const sub of this._subs.values()) {
      sub.active = false;
      sub.ref = null;
    }
    for (const p of this._pending.values()) {
      if (p.reject) {
        p.reject(new WsRelayError("disconnected",
          "the connection dropped before the publish was acknowledged; it may or may not have been published"));
      }
    }
    this._pending.clear();
    this._scheduleReconnect(info);
  }

  _scheduleReconnect(info) {
    if (this._closed) return;
    const delay = backoffDelay(this._attempt, this._minDelay, this._maxDelay, this._random);
    const attempt = this._attempt;
    this._attempt++;
    this._setState("connecting");
    this._emit("disconnect", { ...info, delay, attempt });
    this._reconnectTimer = this._setTimeout(() => this._connect(), delay);
  }

  _schedulePing(ms) {
    if (this._pingInterval <= 0) return;
    this._pingTimer = this._setTimeout(() => this._pingCheck(), Math.max(1, ms));
  }

  _pingCheck() {
    this._pingTimer = null;
    const ws = this._ws;
    if (!ws || !this._isOpen()) return;
    const now = this._now();
    const quiet = now - this._lastRx;
    if (this._pingSentAt && this._lastRx < this._pingSentAt) {
      // Pinged and nothing came back since.
      if (now - this._pingSentAt >= this._pingTimeout) {
        this._drop(ws, 4001, "ping timeout");
        return;
      }
      this._schedulePing(this._pingSentAt + this._pingTimeout - now);
      return;
    }
    if (quiet >= this._pingInterval) {
      this._pingSentAt = now;
      this._send({ op: "ping", ref: this._ref() });
      this._schedulePing(this._pingTimeout);
      return;
    }
    this._schedulePing(this._pingInterval - quiet);
  }

  // ---------------------------------------------------------------- frames in

  _onMessage(ws, ev) {
    if (this._ws !== ws) return;
    this._lastRx = this._now();
    if (typeof ev.data !== "string") {
      this._emit("error", new WsRelayError("bad_frame", "binary frame on a wsrelay.v1 connection"));
      return;
    }
    let m;
    try {
      m = JSON.parse(ev.data);
    } catch {
      this._emit("error", new WsRelayError("bad_json", "server sent a frame that is not JSON"));
      return;
    }
    if (!m || typeof m !== "object") return;
    switch (m.type) {
      case "message": return this._onDelivery(m);
      case "subscribed": return this._onSubscribed(m);
      case "published": return this._onPublished(m);
      case "unsubscribed":
        if (m.ref === undefined && typeof m.reason === "string") return this._onEnded(m);
        this._pending.delete(m.ref);
        return;
      case "pong": this._pending.delete(m.ref); return;
      case "welcome":
        this.session = m.session ?? null;
        this.clientId = m.client ?? null;
        if (m.ref !== undefined) this._pending.delete(m.ref);
        this._emit("welcome", { session: m.session, resumed: !!m.resumed, url: this.url, client: this.clientId });
        if (!this._wsOpen) {
          // The answer to our `connect` (or a server that needs no token): usable now.
          if (m.ref === undefined) this._token = null;
          this._ready();
          this._scheduleRefresh();
        }
        return;
      case "presence":
      case "presence_stats":
      case "history": return this._onAnswer(m);
      case "refreshed": return this._onRefreshed(m);
      case "join":
      case "leave": return this._onPresenceEvent(m);
      case "error": return this._onError(m);
      default: return; // unknown frame types are ignored (forward compatibility)
    }
  }

  _onSubscribed(m) {
    const sub = this._subs.get(m.channel);
    let requested = null;
    if (m.ref !== undefined) {
      const p = this._pending.get(m.ref);
      this._pending.delete(m.ref);
      // A reply to a subscribe this subscription no longer waits for (unsubscribed since): ignore.
      if (!p || p.kind !== "subscribe" || !sub || p.sub !== sub || sub.ref !== m.ref) return;
      requested = p.from;
    } else if (!sub || sub.active) {
      return;
    }
    sub.active = true;
    sub.ref = null;
    const offset = typeof m.offset === "number" ? m.offset : null;
    const epoch = typeof m.epoch === "string" ? m.epoch : null;
    let recovery = null;
    if (requested && m.recovered === true && offset !== null && epoch === requested.epoch) {
      // Everything after requested.offset follows, in order: keep our position so the replay is
      // delivered (and anything at or below it dropped).
      sub.offset = requested.offset;
      sub.epoch = requested.epoch;
      recovery = { ok: true };
    } else {
      // No recovery asked, or it failed: live messages continue after the channel's position.
      sub.offset = offset;
      sub.epoch = epoch;
      if (requested) {
        const reason = epoch !== null && epoch !== requested.epoch ? "epoch_changed" : "not_covered";
        recovery = { ok: false, reason };
      }
    }
    const info = { channel: sub.channel, offset, epoch, recovered: recovery ? recovery.ok : undefined };
    this._call(sub, "onSubscribed", info);
    if (recovery) {
      const rinfo = {
        channel: sub.channel, offset, epoch,
        fromOffset: requested.offset, fromEpoch: requested.epoch,
      };
      if (!recovery.ok) rinfo.reason = recovery.reason;
      this._call(sub, "onRecovered", recovery.ok, rinfo);
      this._emit("recovered", recovery.ok, rinfo);
    }
  }

  _onDelivery(m) {
    const sub = this._subs.get(m.channel);
    if (!sub || !sub.active) return; // not (yet, or no longer) ours: the subscribe reply decides
    const hasPos = typeof m.offset === "number" && typeof m.epoch === "string";
    if (hasPos && sub.offset !== null && sub.epoch === m.epoch) {
      if (m.offset <= sub.offset) return; // duplicate
      if (m.offset > sub.offset + 1) {
        if (sub.resyncedAt !== sub.offset) {
          // Missed some: resubscribe from the last delivered offset; the replay fills the gap.
          this._resync(sub);
          return;
        }
        // Already resynced from here and the gap is still there: report it and move on.
        const rinfo = {
          channel: sub.channel, offset: m.offset, epoch: m.epoch,
          fromOffset: sub.offset, fromEpoch: sub.epoch, reason: "gap",
        };
        this._call(sub, "onRecovered", false, rinfo);
        this._emit("recovered", false, rinfo);
      }
    } else if (hasPos && sub.epoch !== null && sub.epoch !== m.epoch) {
      // The channel's history was reset while we were connected: what came before may be lost.
      const rinfo = {
        channel: sub.channel, offset: m.offset, epoch: m.epoch,
        fromOffset: sub.offset, fromEpoch: sub.epoch, reason: "epoch_changed",
      };
      sub.offset = m.offset;
      sub.epoch = m.epoch;
      this._call(sub, "onRecovered", false, rinfo);
      this._emit("recovered", false, rinfo);
    }
    if (hasPos) {
      sub.offset = m.offset;
      sub.epoch = m.epoch;
    }
    let data;
    let binary = false;
    if (typeof m.data_b64 === "string") {
      try {
        data = fromBase64(m.data_b64);
        binary = true;
      } catch {
        this._emit("error", new WsRelayError("bad_frame", "invalid data_b64 from server"));
        return;
      }
    } else {
      data = m.data;
    }
    const meta = {
      channel: m.channel,
      offset: hasPos ? m.offset : undefined,
      epoch: hasPos ? m.epoch : undefined,
      binary,
    };
    this._call(sub, "onMessage", data, meta);
    this._emit("message", data, meta);
  }

  _onPublished(m) {
    this._onAnswer(m);
  }

  /** The reply to a publish, presence or history request. */
  _onAnswer(m) {
    const p = this._pending.get(m.ref);
    if (!p || p.kind !== "request") return;
    this._pending.delete(m.ref);
    p.resolve(m);
  }

  _onRefreshed(m) {
    const p = this._pending.get(m.ref);
    if (!p || p.kind !== "refresh") return;
    this._pending.delete(m.ref);
    this._token = p.token;
    this._emit("refreshed", { expires: m.expires });
    this._scheduleRefresh();
  }

  _onPresenceEvent(m) {
    const sub = this._subs.get(m.channel);
    if (!sub || !sub.active) return;
    const p = { channel: m.channel, client: m.client, user: m.user, info: m.info };
    const name = m.type === "join" ? "onJoin" : "onLeave";
    this._call(sub, name, p);
    this._emit(m.type, p);
  }

  // The server ended a subscription by itself (reason "forbidden": the token no longer grants
  // it): dropped like a refused subscribe, and not renewed on reconnect.
  _onEnded(m) {
    const sub = this._subs.get(m.channel);
    if (!sub) return;
    this._subs.delete(m.channel);
    sub.active = false;
    const err = new WsRelayError(m.reason, `the server ended the subscription to ${m.channel} (${m.reason})`);
    if (sub.handlers.onError) this._call(sub, "onError", err);
    else this._emit("error", err);
  }

  _onError(m) {
    const err = new WsRelayError(m.code || "error", m.message || m.code || "server error");
    const p = m.ref !== undefined ? this._pending.get(m.ref) : undefined;
    if (!p) {
      this._emit("error", err);
      return;
    }
    this._pending.delete(m.ref);
    if (p.kind === "request") {
      p.reject(err);
    } else if (p.kind === "refresh") {
      this._emit("error", err);
      this._retryRefresh(this._ws);
    } else if (p.kind === "connect") {
      // The server refused the token: it closes the connection (1008), and we reconnect with
      // a new one.
      this._emit("error", err);
    } else if (p.kind === "subscribe") {
      const sub = p.sub;
      if (this._subs.get(sub.channel) !== sub || sub.ref !== m.ref) return;
      sub.ref = null;
      if (err.code === "unavailable") {
        // History could not be reached; the subscription works live. Our position is unknown
        // from here: do not treat the next offsets as a gap.
        sub.active = true;
        const requested = p.from;
        sub.offset = null;
        sub.epoch = null;
        this._call(sub, "onSubscribed", { channel: sub.channel, offset: undefined, epoch: undefined,
          recovered: requested ? false : undefined });
        if (requested) {
          const rinfo = { channel: sub.channel, offset: undefined, epoch: undefined,
            fromOffset: requested.offset, fromEpoch: requested.epoch, reason: "unavailable" };
          this._call(sub, "onRecovered", false, rinfo);
          this._emit("recovered", false, rinfo);
        }
        return;
      }
      // Refused (forbidden, bad_channel, too_many_channels, ...): the subscription is dropped.
      this._subs.delete(sub.channel);
      if (sub.handlers.onError) this._call(sub, "onError", err);
      else this._emit("error", err);
    } else if (!(p.kind === "unsubscribe" && err.code === "not_subscribed")) {
      this._emit("error", err);
    }
  }

  // ---------------------------------------------------------------- frames out

  _sendSubscribe(sub) {
    const ref = this._ref();
    const msg = { op: "subscribe", channel: sub.channel, ref };
    if (sub.handlers.info !== undefined) msg.info = sub.handlers.info;
    let from = null;
    if (sub.offset !== null && sub.epoch !== null) {
      msg.offset = sub.offset;
      msg.epoch = sub.epoch;
      from = { offset: sub.offset, epoch: sub.epoch };
    }
    sub.ref = ref;
    sub.active = false;
    this._pending.set(ref, { kind: "subscribe", sub, from });
    this._send(msg);
  }

  _resync(sub) {
    sub.resyncedAt = sub.offset;
    sub.active = false;
    this._send({ op: "unsubscribe", channel: sub.channel, ref: this._ref() });
    this._sendSubscribe(sub);
  }

  _unsubscribe(sub) {
    if (this._subs.get(sub.channel) !== sub) return;
    this._subs.delete(sub.channel);
    const wasSent = sub.active || sub.ref !== null;
    sub.active = false;
    sub.ref = null;
    if (wasSent && this._isOpen()) {
      const ref = this._ref();
      this._pending.set(ref, { kind: "unsubscribe" });
      this._send({ op: "unsubscribe", channel: sub.channel, ref });
    }
  }

  _sendRequest(item) {
    const ref = this._ref();
    this._pending.set(ref, { kind: "request", resolve: item.resolve, reject: item.reject });
    this._send({ ...item.msg, ref });
  }

  _send(msg) {
    try {
      this._ws.send(JSON.stringify(msg));
    } catch (e) {
      this._emit("error", e);
    }
  }

  // ---------------------------------------------------------------- helpers

  _isOpen() {
    return this._wsOpen && this._ws !== null;
  }

  _ref() {
    return this._nextRef++;
  }

  _setState(s) {
    if (this.state === s) return;
    this.state = s;
    this._emit("state", s);
  }

  _emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (e) {
        if (event !== "error") this._emit("error", e);
        else setTimeout(() => { throw e; }); // surface it without breaking the client
      }
    }
  }

  _call(sub, name, ...args) {
    const fn = sub.handlers[name];
    if (typeof fn !== "function") return;
    try {
      fn.apply(sub.handlers, args);
    } catch (e) {
      this._emit("error", e);
    }
  }

  _clear(name) {
    if (this[name] !== null) {
      this._clearTimeout(this[name]);
      this[name] = null;
    }
  }

  _clearTimers() {
    this._clear("_connectTimer");
    this._clear("_stableTimer");
    this._clear("_pingTimer");
    this._clear("_refreshTimer");
  }
}

function num(v, dflt) {
  return typeof v === "number" && Number.isFinite(v) && v >= 0 ? v : dflt;
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
}

export default WsRelay;
