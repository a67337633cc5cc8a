// End-to-end test of the Vartalap web client: two browser contexts (alice
// and bob) chat through a running server.
//
//   BASE_URL=http://127.0.0.1:8080 SHOT_DIR=/tmp/shots node chat.mjs
//
// Environment:
//   BASE_URL  server base URL (required)
//   SHOT_DIR  directory for screenshots (optional; none are taken when empty)
//   ALICE, BOB  usernames (default: alice_<run> and bob_<run>, unique per run,
//             so the script can run again against the same server)
//
// Exits 0 when every step passed, 1 with a message naming the failed step
// otherwise. The whole run is bounded by 60 s.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { chromium } from 'playwright-core';

const TOTAL_MS = 60_000;
const STEP_MS = 15_000;
const BASE_URL = (process.env.BASE_URL || '').replace(/\/+$/, '');
const SHOT_DIR = process.env.SHOT_DIR || '';
const run = Date.now().toString(36) + Math.floor(Math.random() * 1296).toString(36);
const ALICE = process.env.ALICE || `alice_${run}`;
const BOB = process.env.BOB || `bob_${run}`;

let browser = null;
let step = 'start';

async function fail(message) {
  console.error(`e2e FAILED at step "${step}": ${message}`);
  const closing = browser ? browser.close().catch(() => {}) : Promise.resolve();
  await Promise.race([closing, new Promise((r) => setTimeout(r, 3_000))]);
  process.exit(1);
}

const watchdog = setTimeout(() => fail(`timed out after ${TOTAL_MS / 1000} s`), TOTAL_MS);

function log(msg) {
  console.log(`[e2e] ${msg}`);
}

async function shot(page, name) {
  if (!SHOT_DIR) return;
  const file = path.join(SHOT_DIR, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}

async function newUserPage(name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('pageerror', (err) => fail(`${name}: uncaught error in the page: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') console.error(`[${name} console] ${msg.text()}`);
  });
  return page;
}

async function login(page, username) {
  step = `login ${username}`;
  await page.goto(`${BASE_URL}/`);
  await page.fill('#login-username', username);
  await page.fill('#login-device', 'web');
  await page.click('#login-submit');
  await page.locator('#chat-view').waitFor({ state: 'visible' });
  await page.locator('#conn-status[data-state="online"]').waitFor();
  const me = await page.textContent('#me');
  if (me !== username) throw new Error(`signed in as "${me}", want "${username}"`);
  log(`${username} signed in and connected`);
}

// openConversation clicks a conversation in the left pane once it is listed.
async function openConversation(page, id) {
  const conv = page.locator(`.conversation[data-id="${id}"] button`);
  await conv.waitFor();
  await conv.click();
  await page.locator(`.conversation.active[data-id="${id}"]`).waitFor();
}

async function send(page, text) {
  await page.fill('#compose-input', text);
  await page.click('#compose-send');
  const mine = page.locator('.message.mine', { hasText: text });
  await mine.waitFor();
  return mine.getAttribute('data-id');
}

async function waitStatus(page, id, states) {
  await page.waitForFunction(
    ([msgId, want]) => {
      const el = document.querySelector(`.message[data-id="${CSS.escape(msgId)}"] .status`);
      return el !== null && want.includes(el.dataset.status);
    },
    [id, states],
    { timeout: STEP_MS },
  ).catch(async () => {
    const got = await page
      .locator(`.message[data-id="${id}"] .status`)
      .getAttribute('data-status', { timeout: 1_000 })
      .catch(() => 'missing');
    throw new Error(`message ${id} has status "${got}", want one of ${states.join(', ')}`);
  });
}

async function waitTheirs(page, text, sender) {
  const msg = page.locator('.message.theirs', { hasText: text });
  await msg.waitFor();
  if (sender !== undefined) {
    const who = await msg.locator('.sender').textContent();
    if (who !== sender) throw new Error(`message "${text}" shows sender "${who}", want "${sender}"`);
  }
}

async function main() {
  if (!BASE_URL) throw new Error('BASE_URL is not set (e.g. BASE_URL=http://127.0.0.1:8080)');
  if (SHOT_DIR) await mkdir(SHOT_DIR, { recursive: true });

  step = 'launch chromium';
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const alice = await newUserPage(ALICE);
  const bob = await newUserPage(BOB);

  await login(alice, ALICE);
  await login(bob, BOB);

  step = 'alice creates a group with bob';
  const groupName = `e2e group ${run}`;
  await alice.click('#new-group-toggle');
  await alice.fill('#new-group-name', groupName);
  await alice.fill('#new-group-members', BOB);
  await alice.click('#new-group-submit');
  const aliceGroup = alice.locator('.conversation[data-kind="group"]', { hasText: groupName });
  await aliceGroup.waitFor();
  const groupId = await aliceGroup.getAttribute('data-id');
  if (!groupId) throw new Error('the new group has no data-id');
  await alice.locator('.message.system', { hasText: 'created the group' }).waitFor();
  await bob.locator(`.conversation[data-id="${groupId}"]`, { hasText: groupName }).waitFor();
  log(`group ${groupId} created and listed for both`);

  step = 'alice sends bob a 1:1 message';
  const hello = `hello bob, this is alice (${run})`;
  await alice.fill('#new-chat-user', BOB);
  await alice.click('#new-chat');
  await alice.locator(`.conversation.active[data-id="${BOB}"]`).waitFor();
  const helloId = await send(alice, hello);
  await waitStatus(alice, helloId, ['sent', 'delivered', 'read']);

  step = 'bob receives the 1:1 message';
  await openConversation(bob, ALICE);
  await waitTheirs(bob, hello);
  log('bob got alice\'s message');

  step = 'bob replies';
  const reply = `hi alice, bob here (${run})`;
  const replyId = await send(bob, reply);
  await waitStatus(bob, replyId, ['sent', 'delivered', 'read']);

  step = 'alice sees the reply and the delivered state';
  await waitTheirs(alice, reply);
  await waitStatus(alice, helloId, ['delivered', 'read']);
  await waitStatus(bob, replyId, ['delivered', 'read']);
  log('alice got the reply; both messages show delivered');
  await shot(alice, 'alice-1to1');
  await shot(bob, 'bob-1to1');

  step = 'alice sends a group message';
  const groupText = `hello group from alice (${run})`;
  await openConversation(alice, groupId);
  const groupMsgId = await send(alice, groupText);
  await waitStatus(alice, groupMsgId, ['sent', 'delivered', 'read']);

  step = 'bob receives the group message';
  await openConversation(bob, groupId);
  await waitTheirs(bob, groupText, ALICE);
  await bob.locator('.message.system', { hasText: 'created the group' }).waitFor();
  await waitStatus(alice, groupMsgId, ['delivered', 'read']);
  log('bob got the group message');

  step = 'no error marks';
  for (const [name, page] of [[ALICE, alice], [BOB, bob]]) {
    const errors = await page.locator('.message .status[data-status="error"]').count();
    if (errors > 0) throw new Error(`${name} shows ${errors} failed message(s)`);
  }

  step = 'screenshots';
  await shot(alice, 'alice-group');
  await shot(bob, 'bob-group');

  await browser.close();
  browser = null;
  clearTimeout(watchdog);
  log('all steps passed');
}

main().catch((err) => fail(err && err.message ? err.message : String(err)));
