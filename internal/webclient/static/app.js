// Vartalap web client: one ES module, no dependencies.
//
// Protocol (server is the same origin, every route under /v1.0):
//   POST /login, POST /logout, GET|POST /groups/, WebSocket /wss/?format=text&ack=true
// Frames are JSON v2.1. Every delivered frame that carries an id is answered
// with a CLIENT_ACK, duplicates included (delivery is at-least-once).

const API = '/v1.0';
const PING_MS = 25_000;
const BACKOFF_MIN_MS = 1_000;
const BACKOFF_MAX_MS = 30_000;
const MAX_MESSAGES_PER_CONVERSATION = 500;
const MAX_SEEN_IDS = 5_000;
const ID_RE = /^[A-Za-z0-9_+@-]{1,64}$/;
const GROUP_ACTIONS = new Set(['add', 'remove', 'update', 'role', 'delete']);
const STATUS_RANK = { pending: 0, sent: 1, delivered: 2, read: 3 };
const STATUS_VIEW = {
  pending: ['…', 'sending'],
  sent: ['✓', 'sent'],
  delivered: ['✓✓', 'delivered'],
  read: ['✓✓', 'read'],
  error: ['✗', 'not sent'],
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- cookies

function getCookie(name) {
  for (const part of document.cookie.split(';')) {
    const i = part.indexOf('=');
    if (i < 0) continue;
    if (part.slice(0, i).trim() === name) {
      try {
        return decodeURIComponent(part.slice(i + 1).trim());
      } catch {
        return '';
      }
    }
  }
  return '';
}

function setCookie(name, value, maxAgeSeconds) {
  const secure = location.protocol === 'https:' ? '; Secure' : '';
  document.cookie = `${name}=${encodeURIComponent(value)}; path=/; max-age=${maxAgeSeconds}; SameSite=Strict${secure}`;
}

const session = {
  get user() { return getCookie('user'); },
  get key() { return getCookie('accesskey'); },
  save(user, key) {
    const year = 365 * 24 * 3600;
    setCookie('user', user, year);
    setCookie('accesskey', key, year);
  },
  clear() {
    setCookie('user', '', 0);
    setCookie('accesskey', '', 0);
  },
};

// ---------------------------------------------------------------- HTTP

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (session.user) {
    headers.user = session.user;
    headers.accesskey = session.key;
  }
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(API + path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  const text = await res.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const msg = (data && (data.message || data.error)) || `${res.status} ${res.statusText}`;
    throw new HTTPError(res.status, msg);
  }
  return data;
}

// ---------------------------------------------------------------- store

// Store keeps one user's conversations and messages in localStorage.
// Conversation keys are "u:<username>" and "g:<groupId>" so a username can
// never collide with a group id.
class Store {
  constructor(user) {
    this.key = `vartalap.v1.${user}`;
    this.convs = {};
    this.msgs = {};
    this.seen = [];
    this.receipts = {}; // message id -> receipt state already sent ("delivered" | "read")
    try {
      const raw = JSON.parse(localStorage.getItem(this.key) || '{}');
      this.convs = raw.convs || {};
      this.msgs = raw.msgs || {};
      this.seen = raw.seen || [];
      this.receipts = raw.receipts || {};
    } catch {
      // a corrupt entry starts a fresh history
    }
    this.seenSet = new Set(this.seen);
    this.byId = new Map();
    for (const [conv, list] of Object.entries(this.msgs)) {
      for (const m of list) this.byId.set(m.id, { conv, m });
    }
    this.timer = 0;
  }

  save() {
    if (this.timer) return;
    this.timer = setTimeout(() => this.flush(), 100);
  }

  flush() {
    clearTimeout(this.timer);
    this.timer = 0;
    const data = { convs: this.convs, msgs: this.msgs, seen: this.seen, receipts: this.receipts };
    try {
      localStorage.setItem(this.key, JSON.stringify(data));
    } catch {
      // quota exceeded: keep going in memory
    }
  }

  conv(key, init) {
    let c = this.convs[key];
    if (!c) {
      const [kind, id] = splitKey(key);
      c = { key, kind, id, name: id, unread: 0, last: 0, members: [], left: false, ...init };
      this.convs[key] = c;
      this.save();
    }
    return c;
  }

  // markSeen records an incoming id; it returns false when it was seen before.
  markSeen(id) {
    if (this.seenSet.has(id)) return false;
    this.seenSet.add(id);
    this.seen.push(id);
    if (this.seen.length > MAX_SEEN_IDS) {
      for (const old of this.seen.splice(0, this.seen.length - MAX_SEEN_IDS)) this.seenSet.delete(old);
    }
    this.save();
    return true;
  }

  add(convKey, m) {
    const list = (this.msgs[convKey] ||= []);
    list.push(m);
    list.sort((a, b) => a.ts - b.ts);
    if (list.length > MAX_MESSAGES_PER_CONVERSATION) {
      for (const old of list.splice(0, list.length - MAX_MESSAGES_PER_CONVERSATION)) {
        this.byId.delete(old.id);
        delete this.receipts[old.id];
      }
    }
    this.byId.set(m.id, { conv: convKey, m });
    const c = this.conv(convKey);
    c.last = Math.max(c.last, m.ts);
    this.save();
  }

  find(id) {
    return this.byId.get(id);
  }

  pending() {
    const out = [];
    for (const { conv, m } of this.byId.values()) {
      if (m.mine && m.status === 'pending') out.push({ conv, m });
    }
    return out.sort((a, b) => a.m.ts - b.m.ts);
  }
}

function splitKey(key) {
  const i = key.indexOf(':');
  return [key.slice(0, i) === 'g' ? 'group' : 'user', key.slice(i + 1)];
}

const userKey = (u) => `u:${u}`;
const groupKey = (g) => `g:${g}`;

// ---------------------------------------------------------------- app state

const state = {
  me: '',
  store: null,
  active: '',
  ws: null,
  wsOpen: false,
  stopped: true,
  backoff: BACKOFF_MIN_MS,
  reconnectTimer: 0,
  pingTimer: 0,
  counter: 0,
};

function newId() {
  state.counter = (state.counter + 1) % 1_000_000;
  return `${state.me}${Date.now()}${state.counter}`;
}

// ---------------------------------------------------------------- WebSocket

function connect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = 0;
  if (state.stopped) return;
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${proto}//${location.host}${API}/wss/?format=text&ack=true`);
  state.ws = ws;
  let opened = false;
  setConn('connecting');

  ws.addEventListener('open', () => {
    if (state.ws !== ws) return;
    opened = true;
    state.wsOpen = true;
    state.backoff = BACKOFF_MIN_MS;
    setConn('online');
    hideNotice();
    clearInterval(state.pingTimer);
    state.pingTimer = setInterval(() => {
      if (ws.readyState === WebSocket.OPEN) ws.send('ping');
    }, PING_MS);
    // Resend what the server has not acknowledged, with the same ids: the
    // server stores a resend once.
    for (const { conv, m } of state.store.pending()) sendFrame(frameFor(conv, m));
    refreshGroups();
    sendReadReceipts();
  });

  ws.addEventListener('message', (ev) => {
    if (state.ws !== ws || typeof ev.data !== 'string') return;
    if (ev.data === 'pong') return;
    let parsed;
    try {
      parsed = JSON.parse(ev.data);
    } catch {
      console.warn('vartalap: undecodable frame', ev.data.slice(0, 200));
      return;
    }
    // Before seed v2.8.0 a frame could carry an array of messages.
    for (const f of Array.isArray(parsed) ? parsed : [parsed]) {
      if (f && typeof f === 'object') handleFrame(f);
    }
  });

  ws.addEventListener('close', async (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.wsOpen = false;
    clearInterval(state.pingTimer);
    if (state.stopped) return;
    if (ev.code === 4001) {
      stop();
      session.clear();
      showLogin('You were signed out: this device logged out or signed in again elsewhere.');
      return;
    }
    if (ev.code === 4002) {
      stop();
      setConn('closed');
      showNotice('This device connected from another tab or window, so this one was disconnected.',
        'Reconnect', () => { state.stopped = false; connect(); });
      return;
    }
    if (!opened && (await credentialsRejected()) && !state.stopped) {
      stop();
      session.clear();
      showLogin('Your session has expired. Please sign in again.');
      return;
    }
    scheduleReconnect();
  });
}

// credentialsRejected asks the server whether our access key is still valid
// (a rejected WebSocket upgrade is indistinguishable from a network error).
async function credentialsRejected() {
  try {
    await api('GET', '/profile/');
    return false;
  } catch (err) {
    return err instanceof HTTPError && err.status === 401;
  }
}

function scheduleReconnect() {
  if (state.stopped || state.reconnectTimer) return;
  const delay = state.backoff * (0.5 + Math.random() / 2);
  state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
  setConn('offline', `reconnecting in ${Math.round(delay / 1000)} s`);
  state.reconnectTimer = setTimeout(connect, delay);
}

function stop() {
  state.stopped = true;
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = 0;
  clearInterval(state.pingTimer);
  const ws = state.ws;
  state.ws = null;
  state.wsOpen = false;
  if (ws) ws.close(1000, 'bye');
}

function sendFrame(frame) {
  if (!state.wsOpen || !state.ws) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

function clientAck(id) {
  sendFrame({ _v: 2.1, id, head: { type: 'INDIVIDUAL', to: 'server', contentType: 'CLIENT_ACK' }, body: {} });
}

// ---------------------------------------------------------------- incoming

function handleFrame(f) {
  const head = f.head || {};
  const id = typeof f.id === 'string' ? f.id : '';
  const contentType = String(head.contentType || '').toUpperCase();
  const action = String(head.action || '');

  if (contentType === 'SERVER_ACK') {
    onServerAck(id, f.serverTimestamp);
    return;
  }
  if (contentType === 'CLIENT_ACK') return;

  try {
    if (contentType === 'NOTIFICATION' && action === 'error' && head.from === 'server') {
      onError(id, f.body || {});
    } else if (contentType === 'NOTIFICATION' && action === 'state') {
      if (id && state.store.markSeen(id)) onReceipt(head.from, f.body || {});
    } else if (contentType === 'NOTIFICATION' && GROUP_ACTIONS.has(action) && isGroupEvent(head)) {
      if (!id || state.store.markSeen(id)) onGroupEvent(f, action);
    } else if (!id || state.store.markSeen(id)) {
      onChatMessage(f);
    }
  } finally {
    if (id) clientAck(id);
  }
}

// isGroupEvent tells the groups service's events (channel INDIVIDUAL,
// destination the group id) from members' messages to a group (channel
// GROUP), which must never change the group view whatever action they name.
function isGroupEvent(head) {
  return String(head.type || '').toUpperCase() !== 'GROUP'
    && typeof head.to === 'string' && head.to !== '' && head.to !== state.me;
}

function upgradeStatus(m, status) {
  if (m.status === 'error') return false;
  if ((STATUS_RANK[status] ?? -1) <= (STATUS_RANK[m.status] ?? -1)) return false;
  m.status = status;
  return true;
}

function onServerAck(id, serverTs) {
  const hit = state.store.find(id);
  if (!hit || !hit.m.mine) return;
  if (typeof serverTs === 'number' && serverTs > 0) hit.m.ts = serverTs;
  if (upgradeStatus(hit.m, 'sent')) {
    state.store.save();
    renderMessage(hit.conv, hit.m);
  }
}

function onError(id, body) {
  const msgId = typeof body.id === 'string' && body.id ? body.id : id;
  const reason = String(body.reason || body.code || 'rejected by the server');
  const hit = state.store.find(msgId);
  if (!hit || !hit.m.mine) {
    showNotice(`Server error: ${reason}`);
    return;
  }
  hit.m.status = 'error';
  hit.m.error = reason;
  state.store.save();
  renderMessage(hit.conv, hit.m);
}

function onReceipt(from, body) {
  const st = body.state === 'read' ? 'read' : body.state === 'delivered' ? 'delivered' : '';
  if (!st || !Array.isArray(body.ids)) return;
  for (const mid of body.ids) {
    const hit = state.store.find(String(mid));
    if (!hit || !hit.m.mine) continue;
    // Only the recipient of a 1:1 message, or a member of the group, may confirm it.
    const c = state.store.convs[hit.conv];
    if (c && c.kind === 'user' && c.id !== from) continue;
    if (upgradeStatus(hit.m, st)) renderMessage(hit.conv, hit.m);
  }
  state.store.save();
}

function onGroupEvent(f, action) {
  const head = f.head;
  const gid = String(head.to);
  const key = groupKey(gid);
  const c = state.store.conv(key, { kind: 'group', id: gid });
  const body = f.body || {};
  const who = (u) => (u === state.me ? 'you' : u);
  const actor = head.from === state.me ? 'You' : head.from;
  let text;
  switch (action) {
    case 'add': {
      const names = (body.added || []).map((a) => (a && a.username) || String(a));
      const others = names.filter((n) => n !== head.from).map(who);
      if (names.includes(head.from)) {
        text = `${actor} created the group${others.length ? ` with ${others.join(', ')}` : ''}`;
      } else {
        text = `${actor} added ${others.join(', ') || 'members'}`;
      }
      break;
    }
    case 'remove': {
      const removed = (body.removed || []).map(String);
      if (removed.length === 1 && removed[0] === head.from) text = `${actor} left`;
      else text = `${actor} removed ${removed.map(who).join(', ')}`;
      if (removed.includes(state.me)) c.left = true;
      break;
    }
    case 'update':
      if (body.name) {
        c.name = String(body.name);
        text = `${actor} renamed the group to “${c.name}”`;
      } else {
        text = `${actor} changed the group picture`;
      }
      break;
    case 'role':
      text = `${actor} made ${who(body.username)} ${body.role === 'admin' ? 'an admin' : 'a member'}`;
      break;
    case 'delete':
      text = `${actor} deleted the group`;
      c.left = true;
      break;
  }
  const m = {
    id: f.id || newId(),
    from: head.from,
    text,
    ts: tsOf(f),
    system: true,
  };
  state.store.add(key, m);
  if (state.active !== key) c.unread += 1;
  renderConversations();
  if (state.active === key) {
    renderMessage(key, m);
    renderHeader();
  }
  refreshGroups();
}

function onChatMessage(f) {
  const head = f.head || {};
  const from = String(head.from || '');
  const isGroup = String(head.type || '').toUpperCase() === 'GROUP';
  const mine = from === state.me;
  let key;
  if (isGroup) key = groupKey(String(head.to));
  else key = userKey(mine ? String(head.to) : from);
  if (!key.slice(2)) return;
  if (mine && state.store.find(f.id)) return; // our own message, echoed from another device
  const c = state.store.conv(key, isGroup ? { kind: 'group' } : {});
  if (isGroup && c.name === c.id) refreshGroups(); // a group we have not listed yet
  const body = f.body && typeof f.body === 'object' ? f.body : {};
  const m = {
    id: f.id || newId(),
    from,
    text: typeof body.text === 'string' ? body.text : `[${head.contentType || 'message'}]`,
    ts: tsOf(f),
    mine,
    status: mine ? 'sent' : undefined,
  };
  state.store.add(key, m);
  if (!mine) {
    if (state.active !== key || document.hidden) c.unread += 1;
    if (f.id) sendReceipt(from, [f.id], 'delivered');
  }
  renderConversations();
  if (state.active === key) renderMessage(key, m);
  sendReadReceipts();
}

function tsOf(f) {
  const ts = Number(f.serverTimestamp);
  return Number.isFinite(ts) && ts > 0 ? ts : Date.now();
}

// ---------------------------------------------------------------- receipts

// sendReceipt tells the sender of ids that they reached this device
// ("delivered") or were shown ("read"). Receipts are NOTIFICATION messages
// with action "state", as the Vartalap app sends them.
function sendReceipt(to, ids, st) {
  if (!ID_RE.test(to) || to === 'server') return;
  const fresh = ids.filter((i) => STATUS_RANK[state.store.receipts[i]] === undefined
    || STATUS_RANK[state.store.receipts[i]] < STATUS_RANK[st]);
  if (!fresh.length) return;
  const frame = {
    _v: 2.1,
    id: newId(),
    head: { type: 'INDIVIDUAL', to, contentType: 'notification', action: 'state', category: 'system', ephemeral: false },
    body: { ids: fresh, state: st },
  };
  if (!sendFrame(frame)) return;
  for (const i of fresh) state.store.receipts[i] = st;
  state.store.save();
}

function sendReadReceipts() {
  if (!state.active || document.hidden || !state.wsOpen) return;
  const bySender = new Map();
  for (const m of state.store.msgs[state.active] || []) {
    if (m.mine || m.system || state.store.receipts[m.id] === 'read') continue;
    if (!bySender.has(m.from)) bySender.set(m.from, []);
    bySender.get(m.from).push(m.id);
  }
  for (const [from, ids] of bySender) sendReceipt(from, ids, 'read');
}

// ---------------------------------------------------------------- sending

function frameFor(convKey, m) {
  const c = state.store.convs[convKey];
  const group = c && c.kind === 'group';
  return {
    _v: 2.1,
    id: m.id,
    head: {
      type: group ? 'GROUP' : 'INDIVIDUAL',
      to: c.id,
      contentType: 'text',
      action: 'message',
      chatid: group ? c.id : state.me,
    },
    body: { text: m.text },
  };
}

function send(text) {
  const key = state.active;
  const c = state.store.convs[key];
  if (!c || c.left) return;
  const m = { id: newId(), from: state.me, text, ts: Date.now(), mine: true, status: 'pending' };
  state.store.markSeen(m.id);
  state.store.add(key, m);
  renderMessage(key, m);
  renderConversations();
  sendFrame(frameFor(key, m)); // when offline it stays pending and goes out on reconnect
}

// ---------------------------------------------------------------- groups

let groupsInFlight = null;

async function refreshGroups() {
  if (groupsInFlight) return groupsInFlight;
  groupsInFlight = (async () => {
    try {
      const groups = await api('GET', '/groups/');
      if (!Array.isArray(groups) || !state.store) return;
      const current = new Set();
      for (const g of groups) {
        if (!g || typeof g.groupId !== 'string') continue;
        const key = groupKey(g.groupId);
        current.add(key);
        const c = state.store.conv(key, { kind: 'group' });
        c.name = g.name || g.groupId;
        c.members = (g.members || []).map((mm) => ({ username: mm.username, role: mm.role }));
        c.left = false;
      }
      for (const c of Object.values(state.store.convs)) {
        if (c.kind === 'group' && !current.has(c.key)) c.left = true;
      }
      state.store.save();
      renderConversations();
      renderHeader();
    } catch (err) {
      console.warn('vartalap: group list', err);
    } finally {
      groupsInFlight = null;
    }
  })();
  return groupsInFlight;
}

// ---------------------------------------------------------------- rendering

function setConn(st, detail) {
  const el = $('conn-status');
  el.dataset.state = st;
  el.textContent = detail ? `${st} · ${detail}` : st;
}

function showNotice(text, actionLabel, action) {
  $('notice-text').textContent = text;
  const btn = $('notice-action');
  btn.hidden = !actionLabel;
  btn.textContent = actionLabel || '';
  btn.onclick = action ? () => { hideNotice(); action(); } : null;
  $('notice').hidden = false;
}

function hideNotice() {
  $('notice').hidden = true;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

function renderConversations() {
  const list = $('conversations');
  const convs = Object.values(state.store.convs).sort((a, b) => b.last - a.last || a.name.localeCompare(b.name));
  list.replaceChildren(...convs.map((c) => {
    const li = document.createElement('li');
    li.className = 'conversation';
    li.dataset.id = c.id;
    li.dataset.kind = c.kind;
    if (c.key === state.active) li.classList.add('active');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.addEventListener('click', () => openConversation(c.key));
    if (c.key === state.active) btn.setAttribute('aria-current', 'true');
    const icon = document.createElement('span');
    icon.className = 'avatar';
    icon.setAttribute('aria-hidden', 'true');
    icon.textContent = c.kind === 'group' ? '#' : (c.name[0] || '?').toUpperCase();
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = c.name;
    const last = (state.store.msgs[c.key] || []).at(-1);
    const preview = document.createElement('span');
    preview.className = 'preview';
    preview.textContent = c.left ? 'you are not a member' : last ? last.text : c.kind === 'group' ? 'group' : '';
    btn.append(icon, name, preview);
    if (c.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'badge';
      badge.textContent = String(c.unread);
      badge.setAttribute('aria-label', `${c.unread} unread`);
      btn.append(badge);
    }
    li.append(btn);
    return li;
  }));
}

function renderHeader() {
  const c = state.store && state.store.convs[state.active];
  $('chat-title').textContent = c ? c.name : 'No conversation selected';
  let sub = '';
  if (c && c.kind === 'group') {
    sub = c.left ? 'You are not a member of this group'
      : c.members.map((m) => (m.role === 'admin' ? `${m.username} (admin)` : m.username)).join(', ');
  }
  $('chat-subtitle').textContent = sub;
  $('compose-form').hidden = !c;
  $('empty-state').hidden = Boolean(c);
  $('compose-input').disabled = !c || c.left;
  $('compose-send').disabled = !c || c.left;
}

function messageElement(convKey, m) {
  const li = document.createElement('li');
  li.dataset.id = m.id;
  li.dataset.ts = String(m.ts);
  const c = state.store.convs[convKey];
  if (m.system) {
    li.className = 'message system';
    li.textContent = m.text;
    return li;
  }
  li.className = `message ${m.mine ? 'mine' : 'theirs'}`;
  if (!m.mine && c && c.kind === 'group') {
    const who = document.createElement('span');
    who.className = 'sender';
    who.textContent = m.from;
    li.append(who);
  }
  const text = document.createElement('p');
  text.className = 'text';
  text.textContent = m.text;
  li.append(text);
  const meta = document.createElement('span');
  meta.className = 'meta';
  const time = document.createElement('time');
  const d = new Date(m.ts);
  time.dateTime = d.toISOString();
  time.textContent = timeFmt.format(d);
  time.title = dateFmt.format(d);
  meta.append(time);
  if (m.mine) {
    li.dataset.status = m.status;
    const [glyph, label] = STATUS_VIEW[m.status] || STATUS_VIEW.pending;
    const st = document.createElement('span');
    st.className = 'status';
    st.dataset.status = m.status;
    st.textContent = glyph;
    st.title = label;
    st.setAttribute('aria-label', label);
    meta.append(st);
  }
  li.append(meta);
  if (m.status === 'error') {
    const err = document.createElement('span');
    err.className = 'error-reason';
    err.textContent = m.error || 'not sent';
    li.append(err);
  }
  return li;
}

// renderMessage inserts or replaces one message in the open conversation.
function renderMessage(convKey, m) {
  if (convKey !== state.active) return;
  const list = $('messages');
  const el = messageElement(convKey, m);
  const old = list.querySelector(`.message[data-id="${CSS.escape(m.id)}"]`);
  if (old) {
    old.replaceWith(el);
    return;
  }
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  const after = [...list.children].find((x) => Number(x.dataset.ts) > m.ts);
  if (after) list.insertBefore(el, after);
  else list.append(el);
  if (atBottom || m.mine) el.scrollIntoView({ block: 'end' });
}

function renderMessages() {
  const list = $('messages');
  const msgs = state.store.msgs[state.active] || [];
  list.replaceChildren(...msgs.map((m) => messageElement(state.active, m)));
  list.scrollTop = list.scrollHeight;
}

function openConversation(key) {
  state.active = key;
  const c = state.store.convs[key];
  if (c) c.unread = 0;
  state.store.save();
  document.body.classList.add('show-chat');
  renderConversations();
  renderHeader();
  renderMessages();
  sendReadReceipts();
  if (c && !c.left) $('compose-input').focus();
}

// ---------------------------------------------------------------- views

function showLogin(message) {
  $('chat-view').hidden = true;
  $('login-view').hidden = false;
  const err = $('login-error');
  err.textContent = message || '';
  err.hidden = !message;
  if (state.store) state.store.flush();
  state.store = null;
  state.me = '';
  state.active = '';
  $('login-device').value = localStorage.getItem('vartalap.device') || 'web';
  $('login-username').focus();
}

function showChat() {
  state.me = session.user;
  state.store = new Store(state.me);
  state.active = '';
  $('me').textContent = state.me;
  $('login-view').hidden = true;
  $('chat-view').hidden = false;
  hideNotice();
  renderConversations();
  renderHeader();
  $('messages').replaceChildren();
  state.stopped = false;
  state.backoff = BACKOFF_MIN_MS;
  connect();
}

async function login(ev) {
  ev.preventDefault();
  const username = $('login-username').value.trim();
  const deviceId = $('login-device').value.trim() || 'web';
  const err = $('login-error');
  err.hidden = true;
  if (!ID_RE.test(username) || username === 'server') {
    err.textContent = 'A username is 1 to 64 letters, digits or _ - + @.';
    err.hidden = false;
    return;
  }
  if (!ID_RE.test(deviceId)) {
    err.textContent = 'A device id is 1 to 64 letters, digits or _ - + @.';
    err.hidden = false;
    return;
  }
  $('login-submit').disabled = true;
  try {
    const res = await api('POST', '/login', { username, authToken: 'dev', deviceId, notificationToken: '' });
    if (!res || !res.accesskey) throw new Error('the server sent no access key');
    session.save(res.username || username, res.accesskey);
    localStorage.setItem('vartalap.device', deviceId);
    showChat();
  } catch (e) {
    err.textContent = `Sign-in failed: ${e.message}`;
    err.hidden = false;
  } finally {
    $('login-submit').disabled = false;
  }
}

async function logout() {
  stop();
  try {
    await api('POST', '/logout');
  } catch (e) {
    console.warn('vartalap: logout', e);
  }
  session.clear();
  showLogin();
}

// ---------------------------------------------------------------- wiring

function init() {
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', logout);

  $('new-chat-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const input = $('new-chat-user');
    const name = input.value.trim();
    if (!ID_RE.test(name) || name === 'server') {
      showNotice('A username is 1 to 64 letters, digits or _ - + @.');
      return;
    }
    state.store.conv(userKey(name));
    input.value = '';
    openConversation(userKey(name));
  });

  $('new-group-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const name = $('new-group-name').value.trim();
    const members = $('new-group-members').value.split(',').map((s) => s.trim()).filter(Boolean);
    const err = $('new-group-error');
    err.hidden = true;
    const bad = members.filter((m) => !ID_RE.test(m));
    if (!name || bad.length) {
      err.textContent = !name ? 'The group needs a name.' : `Not a valid username: ${bad.join(', ')}`;
      err.hidden = false;
      return;
    }
    $('new-group-submit').disabled = true;
    try {
      const res = await api('POST', '/groups/', { name, members });
      if (!res || typeof res.groupId !== 'string') throw new Error('the server sent no group id');
      const key = groupKey(res.groupId);
      state.store.conv(key, { kind: 'group', name });
      $('new-group-name').value = '';
      $('new-group-members').value = '';
      $('new-group-panel').open = false;
      openConversation(key);
      await refreshGroups();
    } catch (e) {
      err.textContent = `Could not create the group: ${e.message}`;
      err.hidden = false;
    } finally {
      $('new-group-submit').disabled = false;
    }
  });

  const input = $('compose-input');
  $('compose-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = '';
    autosize(input);
    send(text);
  });
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $('compose-form').requestSubmit();
    }
  });
  input.addEventListener('input', () => autosize(input));

  $('back').addEventListener('click', () => document.body.classList.remove('show-chat'));
  document.addEventListener('visibilitychange', sendReadReceipts);
  window.addEventListener('focus', sendReadReceipts);
  window.addEventListener('pagehide', () => state.store && state.store.flush());
  window.addEventListener('online', () => {
    if (!state.stopped && !state.ws) connect();
  });

  if (session.user && session.key) showChat();
  else showLogin();
}

function autosize(el) {
  el.style.height = 'auto';
  el.style.height = `${Math.min(el.scrollHeight, 160)}px`;
}

init();
