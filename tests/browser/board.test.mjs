// End-to-end tests of the board in headless Chromium (Debian's `chromium`, driven by
// playwright-core), against the real `pitwall` binary, changed by its gRPC client (`pitwall
// session …`, `pitwall packets send`). A screenshot of each view is written to
// target/board-screenshots/.
//
//   node --test tests/browser/        (scripts/test runs it after building target/debug/pitwall)
//
// PITWALL_BIN names another binary; CHROMIUM another browser.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { chromium } from 'playwright-core';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const binary = process.env.PITWALL_BIN || join(root, 'target/debug/pitwall');
const browserPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = join(root, 'target/board-screenshots');
// Without the background-networking flags Chromium keeps trying hosts a closed network
// refuses.
const CHROMIUM_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
/// What the issue promises: a change shows within a second.
const WITHIN_A_SECOND = 1000;
/// How soon a stream's rate must show once packets flow: rates are over whole seconds and the
/// page asks once a second, so two seconds, with room for the writers' own start.
const WITHIN_A_FEW_SECONDS = 5000;
/// Upper bound for anything else a test waits for; reaching it fails the test.
const PATIENCE = 20000;

const scratch = mkdtempSync(join(tmpdir(), 'pitwall-board-'));
let browser;
const servers = [];
/// `pitwall packets send` processes still writing.
const senders = [];

/// A free loopback port (asked of the kernel, then released for the server to take).
function freePort() {
  return new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.on('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolvePort(port));
    });
  });
}

/// `pitwall serve` on fixed loopback ports, so that it can be restarted where the page
/// expects it.
class Server {
  constructor(name, extra = []) {
    this.dataDir = join(scratch, name);
    this.extra = extra;
    this.token = null;
  }

  async start(ports) {
    this.grpcPort = ports ? ports.grpc : await freePort();
    this.adminPort = ports ? ports.admin : await freePort();
    const readyFile = join(scratch, `ready-${this.grpcPort}.json`);
    rmSync(readyFile, { force: true });
    this.log = '';
    this.child = spawn(binary, [
      'serve', '--data-dir', this.dataDir,
      '--listen', `127.0.0.1:${this.grpcPort}`, '--metrics-listen', `127.0.0.1:${this.adminPort}`,
      '--ready-file', readyFile, ...this.extra,
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.child.stderr.on('data', (chunk) => { this.log += chunk; });
    this.exited = new Promise((resolveExit) => this.child.on('exit', (code, signal) => resolveExit({ code, signal })));
    servers.push(this);
    // The ready file is the signal; there is nothing to await but polling it.
    const deadline = Date.now() + PATIENCE;
    while (!existsSync(readyFile)) {
      if (this.child.exitCode !== null) throw new Error(`pitwall exited before it was ready:\n${this.log}`);
      if (Date.now() > deadline) throw new Error(`pitwall was not ready in time:\n${this.log}`);
      await new Promise((wake) => setTimeout(wake, 20));
    }
    return this;
  }

  /// SIGTERM, and a clean exit.
  async stop() {
    this.child.kill('SIGTERM');
    const { code, signal } = await this.exited;
    assert.equal(code, 0, `pitwall exited with ${code ?? signal}:\n${this.log}`);
  }

  get base() {
    return `http://127.0.0.1:${this.adminPort}`;
  }

  /// A `pitwall session …` command (the gRPC client); its standard output, trimmed.
  async session(...args) {
    const env = { ...process.env, PITWALL_SERVER: `http://127.0.0.1:${this.grpcPort}` };
    if (this.token) env.PITWALL_TOKEN = this.token;
    const { stdout } = await promisify(execFile)(binary, ['session', ...args], { env });
    return stdout.trim();
  }

  async create(dataSource, identifier, details = {}, more = []) {
    const args = ['create', '--data-source', dataSource, '--identifier', identifier, ...more];
    for (const [key, value] of Object.entries(details)) args.push('--detail', `${key}=${value}`);
    return this.session(...args);
  }

  /// `pitwall packets send ARGS…` writing in the background; `stop()` ends it as Ctrl-C does
  /// and gives the number of packets it printed as acknowledged.
  sendPackets(...args) {
    const env = { ...process.env, PITWALL_SERVER: `http://127.0.0.1:${this.grpcPort}` };
    if (this.token) env.PITWALL_TOKEN = this.token;
    const child = spawn(binary, ['packets', 'send', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (chunk) => { output += chunk; });
    child.stderr.on('data', (chunk) => { output += chunk; });
    const exited = new Promise((resolveExit) => child.on('exit', (code, signal) => resolveExit({ code, signal })));
    senders.push(child);
    return {
      async stop() {
        child.kill('SIGINT');
        const { code, signal } = await exited;
        assert.equal(code, 0, `packets send exited with ${code ?? signal}:\n${output}`);
        const match = output.match(/^(\d+) packets acknowledged$/m);
        assert.ok(match, output);
        return Number(match[1]);
      },
    };
  }

  /// What the server lists now (its sequence, counts, sessions).
  async listing(query = '') {
    const headers = this.readToken ? { authorization: `Bearer ${this.readToken}` } : {};
    const response = await fetch(`${this.base}/api/board${query}`, { headers });
    assert.equal(response.status, 200);
    return response.json();
  }
}

async function openPage(url, options = {}) {
  const context = await browser.newContext({
    viewport: options.viewport || { width: 1440, height: 900 },
    colorScheme: options.colorScheme || 'dark',
    deviceScaleFactor: 1,
  });
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (error) => page.errors.push(error.message));
  await page.goto(url);
  return page;
}

async function waitLive(page) {
  await page.waitForSelector('#status[data-state="live"]', { timeout: PATIENCE });
}

function row(table, key) {
  return `#${table} tr[data-key="${key}"]`;
}

async function waitRow(page, table, key, timeout = PATIENCE) {
  await page.waitForSelector(row(table, key), { timeout });
}

async function waitNoRow(page, table, key, timeout = PATIENCE) {
  await page.waitForSelector(row(table, key), { state: 'detached', timeout });
}

async function shoot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

function stats(page) {
  return page.evaluate(() => ({ ...window.pitwallBoard.stats }));
}

before(async () => {
  assert.ok(existsSync(binary), `no pitwall binary at ${binary}: build it first (cargo build --bin pitwall)`);
  assert.ok(existsSync(browserPath),
    `no Chromium at ${browserPath}: install Debian's chromium (scripts/test does: apt-get install chromium)`);
  mkdirSync(shots, { recursive: true });
  browser = await chromium.launch({ executablePath: browserPath, args: CHROMIUM_FLAGS });
});

/// Servers a failed test left running: they must not outlive the run (an exit handler runs
/// even when a hook throws).
function killServers() {
  for (const child of [...senders, ...servers.map((server) => server.child)]) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}
process.on('exit', killServers);

after(async () => {
  killServers();
  try {
    if (browser) await browser.close();
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
});

test('a session created by a gRPC client shows within a second, updates live, and moves to ended', { timeout: 90000 }, async () => {
  const server = await new Server('live').start();
  for (const [car, driver] of [['Car3', 'Jo'], ['Car4', 'Kim'], ['Rig1', 'Bench'], ['Sim2', 'Pat']]) {
    await server.create(car, 'FP2 long run', { driver, lap: 7, tyre: 'soft' }, ['--type', 'Practice']);
  }
  const install = await server.create('Car1', 'Installation lap', { driver: 'Alex', lap: 1 });
  await server.session('end', install);
  const page = await openPage(`${server.base}/?columns=driver,lap,tyre`);
  await waitLive(page);

  const key = await server.create('Car1', 'FP1', { driver: 'Alex', lap: 1, tyre: 'medium' }, ['--type', 'Practice', '--version', '2']);
  await waitRow(page, 'live', key, WITHIN_A_SECOND);
  const cells = await page.$$eval(`${row('live', key)} td`, (tds) => tds.map((td) => td.textContent));
  assert.deepEqual(cells.slice(0, 4), ['FP1', 'Car1', 'Practice', '2']);
  assert.deepEqual(cells.slice(6), ['Alex', '1', 'medium'], 'no packet rate column: nothing is writing');
  assert.match(cells[5], /^0:00:0\d$/, 'a ticking duration');

  await server.session('update', key, '--detail', 'lap=2');
  await page.waitForFunction(
    (selector) => document.querySelectorAll(`${selector} td.detail`)[1]?.textContent === '2',
    row('live', key), { timeout: WITHIN_A_SECOND });
  await page.waitForFunction(
    (selector) => document.querySelector(selector)?.textContent !== '0:00:00',
    `${row('live', key)} td.duration`, { timeout: 3000 });
  await shoot(page, 'board');

  await server.session('end', key);
  await waitRow(page, 'ended', key, WITHIN_A_SECOND);
  await waitNoRow(page, 'live', key, WITHIN_A_SECOND);
  const car1 = await page.$$eval('#sources tr', (rows) => rows.map((r) => r.textContent).find((t) => t.startsWith('Car1')));
  assert.equal(car1, 'Car102', 'Car1: none live, two completed');
  const listed = await server.listing();
  assert.equal((await stats(page)).lastSequence, listed.sequence);
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});

test('filters are kept in the URL, and the session page shows every field and the tree', { timeout: 90000 }, async () => {
  const server = await new Server('filters').start();
  const fp2 = await server.create('Car2', 'FP2', { tyre: 'soft' });
  const q2 = await server.create('Car2', 'Q2', { tyre: 'soft' });
  const fp3 = await server.create('Car3', 'FP3', { tyre: 'soft' });
  const fp4 = await server.create('Car2', 'FP4', { tyre: 'hard' });
  const page = await openPage(`${server.base}/`);
  await waitLive(page);
  await page.fill('#filters input[name=data_source]', 'Car2');
  await page.fill('#filters input[name=identifier]', 'FP*');
  await page.fill('#filters input[name=detail]', 'tyre=soft');
  // The filtered listing is held back until the page has been looked at: while it still shows
  // the unfiltered board, it must not say it is live. (Later listings pass straight through.)
  let release;
  const held = new Promise((resolveHeld) => { release = resolveHeld; });
  await page.route('**/api/board?*', async (route) => { await held; await route.continue(); });
  await page.click('#filters button[type=submit]');
  await page.waitForFunction(() => new URL(location.href).searchParams.get('identifier') === 'FP*');
  const params = new URL(page.url()).searchParams;
  assert.deepEqual([params.getAll('data_source'), params.get('identifier'), params.getAll('detail')],
    [['Car2'], 'FP*', ['tyre=soft']]);
  assert.notEqual(await page.getAttribute('#status', 'data-state'), 'live', 'the old view is not called live');
  release();
  await waitLive(page);
  await waitRow(page, 'live', fp2);
  for (const other of [q2, fp3, fp4]) assert.equal(await page.$(row('live', other)), null);

  // Live changes follow the filter too.
  const hard = await server.create('Car2', 'FP6', { tyre: 'hard' });
  const soft = await server.create('Car2', 'FP5', { tyre: 'soft' });
  await waitRow(page, 'live', soft, WITHIN_A_SECOND);
  assert.equal(await page.$(row('live', hard)), null);
  await server.session('update', fp2, '--detail', 'tyre=hard');
  await waitNoRow(page, 'live', fp2, WITHIN_A_SECOND);
  await shoot(page, 'filtered');

  // The URL is the view: another browser opening it sees the same.
  const shared = await openPage(page.url());
  await waitLive(shared);
  assert.deepEqual(await shared.$$eval('#live tr[data-key]', (rows) => rows.map((r) => r.dataset.key)), [soft]);
  await shared.context().close();

  const stint = await server.create('Car2', 'Stint 1', { driver: 'Sam' });
  const race = await server.create('Car2', 'Race', { driver: 'Sam', laps: 57 }, ['--associate', stint, '--type', 'Race']);
  const replay = await server.create('Sim1', 'Race replay', {}, ['--associate', race]);
  await page.goto(`${server.base}/?data_source=Car2`);
  await waitRow(page, 'live', race);
  await page.click(`${row('live', race)} td.identifier a`);
  await page.waitForSelector('#session-view:not([hidden])');
  assert.equal(new URL(page.url()).searchParams.get('session'), race);
  await waitLive(page);
  const fields = await page.$$eval('#session-fields dt, #session-fields dd', (nodes) => nodes.map((n) => n.textContent));
  const field = (name) => fields[fields.indexOf(name) + 1];
  assert.equal(field('Session key'), race);
  assert.equal(field('Data source'), 'Car2');
  assert.equal(field('Type'), 'Race');
  assert.equal(field('State'), 'live');
  assert.equal(field('Associates'), stint);
  assert.match(field('Created'), /\d{4}-\d\d-\d\dT[\d:.]+Z$/, 'the local time, then the UTC time');
  await page.waitForSelector(`#tree-parents li[data-key="${replay}"] a`);
  await page.waitForSelector(`#tree-children li[data-key="${stint}"] a`);
  const details = await page.$$eval('#session-details tr', (rows) => rows.map((r) => r.textContent));
  assert.deepEqual(details, ['driverSam', 'laps57']);

  // A change to the session shows on its page.
  await server.session('update', race, '--detail', 'laps=58');
  await page.waitForFunction(() => [...document.querySelectorAll('#session-details tr')]
    .some((r) => r.textContent === 'laps58'), null, { timeout: WITHIN_A_SECOND });
  await shoot(page, 'session');

  // Associates are clickable, and the back link returns to the filtered board.
  await page.click(`#tree-children li[data-key="${stint}"] a`);
  await page.waitForFunction((key) => new URL(location.href).searchParams.get('session') === key, stint);
  await page.waitForSelector(`#tree-parents li[data-key="${race}"] a`);
  await page.click('#back');
  await page.waitForSelector('#board-view:not([hidden])');
  assert.deepEqual(new URL(page.url()).searchParams.getAll('data_source'), ['Car2']);
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});

test('large type for a screen across the garage, and a phone', { timeout: 60000 }, async () => {
  const server = await new Server('layouts').start();
  const keys = [];
  for (const [car, driver] of [['Car1', 'Alex'], ['Car2', 'Sam'], ['Car3', 'Jo'], ['Rig1', 'Bench']]) {
    keys.push(await server.create(car, `FP1 ${car}`, { driver, lap: 12, tyre: 'soft', fuel: '41.5' }, ['--type', 'Practice']));
  }
  await server.session('end', await server.create('Car1', 'Installation lap', { driver: 'Alex' }));

  const tv = await openPage(`${server.base}/?tv=1&columns=driver,lap`, { viewport: { width: 1920, height: 1080 } });
  await waitLive(tv);
  const size = await tv.evaluate(() => parseFloat(getComputedStyle(document.documentElement).fontSize));
  assert.ok(size >= 24, `large type is large (${size}px)`);
  assert.equal(await tv.getAttribute('#large-type', 'aria-pressed'), 'true');
  await shoot(tv, 'tv');
  await tv.click('#large-type');
  assert.equal(new URL(tv.url()).searchParams.get('tv'), null, 'the switch is kept in the URL');
  await tv.context().close();

  const phone = await openPage(`${server.base}/`, { viewport: { width: 390, height: 844 } });
  await waitLive(phone);
  await waitRow(phone, 'live', keys[0]);
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `nothing wider than a phone (${overflow}px too wide)`);
  await shoot(phone, 'phone');
  await phone.click(`${row('live', keys[0])} td.identifier a`);
  await phone.waitForSelector('#session-view:not([hidden])');
  await waitLive(phone);
  await shoot(phone, 'phone-session');
  assert.deepEqual(phone.errors, []);
  await phone.context().close();
  await server.stop();
});

test('a server restart while the page is open: it recovers without a reload and loses no event', { timeout: 90000 }, async () => {
  const server = await new Server('restart').start();
  const before = await server.create('Car1', 'Before the restart', { lap: 1 });
  const page = await openPage(`${server.base}/?columns=lap`);
  await waitLive(page);
  await waitRow(page, 'live', before);
  const first = await stats(page);
  const listedAt = first.lastSequence;
  await page.evaluate(() => { window.sameDocument = true; });

  // Changes right before the stop, without waiting for the page.
  const late = await server.create('Car2', 'Just before the stop', { lap: 1 });
  await server.session('update', before, '--detail', 'lap=2');
  const ports = { grpc: server.grpcPort, admin: server.adminPort };
  await server.stop();
  await page.waitForSelector('#status:not([data-state="live"])', { timeout: PATIENCE });

  await server.start(ports);
  // Changes as soon as it is back, whether or not the page has reconnected yet.
  const after = await server.create('Car3', 'After the restart', { lap: 1 });
  await server.session('end', late);
  await server.session('update', after, '--detail', 'lap=5');

  const listed = await server.listing();
  await page.waitForFunction((sequence) => window.pitwallBoard.stats.lastSequence === sequence, listed.sequence, { timeout: PATIENCE });
  await waitLive(page);
  await page.waitForFunction(
    (selector) => document.querySelector(selector)?.textContent === '5', `${row('live', after)} td.detail`, { timeout: PATIENCE });
  await waitRow(page, 'ended', late);
  assert.equal(await page.$eval(`${row('live', before)} td.detail`, (td) => td.textContent), '2');
  assert.equal(await page.evaluate(() => window.sameDocument), true, 'the page was not reloaded');
  const last = await stats(page);
  assert.equal(last.listings, first.listings, 'it resumed from the feed, not by listing again');
  assert.equal(last.duplicates, 0, 'no change arrived twice');
  // The embedded store numbers every change: every one after the listing was applied once.
  assert.equal(last.applied - first.applied, listed.sequence - listedAt, 'no change was lost');
  const counts = await page.$$eval('#sources tr', (rows) => rows.map((r) => r.textContent));
  assert.deepEqual(counts, listed.data_sources.map((s) => `${s.data_source}${s.live}${s.completed}`));
  await shoot(page, 'after-restart');
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});

test('when the history it needs is gone, the page lists again and says so', { timeout: 90000 }, async () => {
  const server = new Server('compacted', ['--feed-max-events', '5']);
  await server.start();
  await server.create('Car1', 'FP1');
  const page = await openPage(`${server.base}/`);
  await waitLive(page);
  const first = await stats(page);
  const ports = { grpc: server.grpcPort, admin: server.adminPort };
  await server.stop();
  // Meanwhile the server runs elsewhere (where the page cannot reach it) and moves on.
  await server.start();
  const missed = [];
  for (let i = 0; i < 12; i += 1) missed.push(await server.create('Car2', `Run ${i}`));
  await server.stop();
  await server.start(ports);

  await page.waitForSelector('#notice:not([hidden])', { timeout: PATIENCE });
  const notice = await page.textContent('#notice-text');
  assert.match(notice, /no longer keeps/);
  assert.match(notice, /listed again/);
  await waitLive(page);
  for (const key of missed) await waitRow(page, 'live', key);
  assert.equal((await stats(page)).listings, first.listings + 1);
  await shoot(page, 'compacted');
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});

test('with tokens, the board asks for a read token once and never puts it in the URL', { timeout: 60000 }, async () => {
  const tokens = join(scratch, 'token-file');
  writeFileSync(tokens, '# role token\nread dashboard-41be07\nwrite logger-7f3a9c\n', { mode: 0o600 });
  const server = new Server('tokens', ['--auth-tokens', tokens]);
  server.token = 'logger-7f3a9c';
  server.readToken = 'dashboard-41be07';
  await server.start();
  const page = await openPage(`${server.base}/`, { colorScheme: 'light' });
  await page.waitForSelector('#sign-in-view:not([hidden])');
  await shoot(page, 'sign-in');

  await page.fill('#sign-in input[name=token]', 'guessed');
  await page.click('#sign-in button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#sign-in-error').textContent.includes('not known'));

  await page.fill('#sign-in input[name=token]', 'dashboard-41be07');
  await page.click('#sign-in button[type=submit]');
  await page.waitForSelector('#board-view:not([hidden])');
  await waitLive(page);
  assert.ok(!page.url().includes('dashboard'), 'no token in the URL');
  assert.equal(await page.evaluate(() => document.cookie), '', 'the page\'s script cannot read it');
  const [cookie] = await page.context().cookies();
  assert.equal(cookie.name, 'pitwall_board');
  assert.equal(cookie.httpOnly, true);
  assert.equal(cookie.sameSite, 'Strict');

  const key = await server.create('Car1', 'Signed in');
  await waitRow(page, 'live', key, WITHIN_A_SECOND);
  await page.click('#sign-out');
  await page.waitForSelector('#sign-in-view:not([hidden])');
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});

/// A stream's row of the telemetry panel: its cells' text by column.
function telemetryRow(page, stream) {
  return page.$$eval(`#telemetry tr[data-stream="${stream}"] td`, (tds) => tds.map((td) => td.textContent));
}

function packetsShown(text) {
  return Number(text.replace(/\D/g, ''));
}

test('a live session\'s page shows its streams and their packet rates, and asks only while shown and live', { timeout: 90000 }, async () => {
  const server = await new Server('telemetry').start();
  const key = await server.create('Car1', 'FP1', { driver: 'Alex' }, ['--type', 'Practice']);
  const mainWriter = server.sendPackets('--data-source', 'Car1', '--session', key, '--count', '1000000', '--rate', '40');
  const lapWriter = server.sendPackets('--data-source', 'Car1', '--session', key, '--stream', 'laps', '--count', '1000000', '--rate', '4');
  const page = await openPage(`${server.base}/?session=${key}`);
  const asked = [];
  page.on('request', (request) => {
    if (request.url().includes('/api/telemetry')) asked.push(request.url());
  });
  await page.waitForSelector('#session-view:not([hidden])');
  await waitLive(page);
  const flowing = (streams) => streams.every((stream) => {
    const rate = document.querySelector(`#telemetry tr[data-stream="${stream}"] td.rate`);
    return rate && parseFloat(rate.textContent) > 0;
  });
  await page.waitForFunction(flowing, ['', 'laps'], { timeout: WITHIN_A_FEW_SECONDS });
  const main = await telemetryRow(page, '');
  assert.equal(main[0], 'main', 'the main stream is named');
  assert.equal((await telemetryRow(page, 'laps'))[0], 'laps');
  const before = packetsShown(main[1]);
  await page.waitForFunction((shown) => Number(document.querySelector('#telemetry tr[data-stream=""] td.packets')
    .textContent.replace(/\D/g, '')) > shown, before, { timeout: WITHIN_A_FEW_SECONDS });
  await page.waitForFunction(() => parseFloat(document.querySelector('#telemetry tr[data-stream=""] td.rate').textContent) >= 10,
    null, { timeout: PATIENCE });
  await shoot(page, 'telemetry');

  const phone = await openPage(`${server.base}/?session=${key}`, { viewport: { width: 390, height: 844 } });
  await phone.waitForFunction(flowing, ['', 'laps'], { timeout: PATIENCE });
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `nothing wider than a phone (${overflow}px too wide)`);
  await phone.locator('section.telemetry').screenshot({ path: join(shots, 'telemetry-phone.png') });
  await phone.context().close();
  const tv = await openPage(`${server.base}/?session=${key}&tv=1`, { viewport: { width: 1920, height: 1080 } });
  await tv.waitForFunction(flowing, ['', 'laps'], { timeout: PATIENCE });
  await tv.locator('section.telemetry').screenshot({ path: join(shots, 'telemetry-tv.png') });
  await tv.context().close();

  // Leaving the page stops its questions: none while a second passes on the board (two ticks
  // of a live duration), though the session is still live. The board shows its rate.
  await page.click('#back');
  await page.waitForSelector('#board-view:not([hidden])');
  await waitRow(page, 'live', key);
  const askedBefore = asked.length;
  await page.waitForFunction((selector) => parseFloat(document.querySelector(selector)?.textContent) > 0,
    `${row('live', key)} td.rate`, { timeout: WITHIN_A_FEW_SECONDS });
  await shoot(page, 'board-rates');
  const duration = `${row('live', key)} td.duration`;
  for (let tick = 0; tick < 2; tick += 1) {
    const shown = await page.textContent(duration);
    await page.waitForFunction(([selector, text]) => document.querySelector(selector).textContent !== text,
      [duration, shown], { timeout: PATIENCE });
  }
  assert.equal(asked.length, askedBefore, 'no telemetry asked for once its page was left');

  // Back on the session: it asks again; once the writers stop, it shows every packet they had
  // acknowledged; once the session ends, it stops asking.
  await page.goBack();
  await page.waitForSelector('#session-view:not([hidden])');
  await page.waitForFunction(flowing, ['', 'laps'], { timeout: PATIENCE });
  const [mainSent, lapsSent] = [await mainWriter.stop(), await lapWriter.stop()];
  assert.ok(mainSent > lapsSent && lapsSent > 0, `${mainSent} and ${lapsSent} packets`);
  await page.waitForFunction(([main, laps]) => {
    const shown = (stream) => Number(document.querySelector(`#telemetry tr[data-stream="${stream}"] td.packets`)
      .textContent.replace(/\D/g, ''));
    return shown('') === main && shown('laps') === laps;
  }, [mainSent, lapsSent], { timeout: PATIENCE });
  await server.session('end', key);
  await page.waitForFunction(() => document.querySelector('#telemetry-note').textContent.includes('has ended'),
    null, { timeout: PATIENCE });
  assert.equal(await page.evaluate(() => window.pitwallBoard.telemetryScheduled()), false);
  assert.deepEqual(page.errors, []);
  await page.context().close();
  await server.stop();
});
