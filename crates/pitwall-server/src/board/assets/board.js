// The Pitwall board: lists sessions once (/api/board, /api/tree), then follows the session
// feed (/api/events, Server-Sent Events) and applies every change as it comes. Each change
// carries its feed sequence; the page remembers the last one it applied and resumes after it
// on every reconnect, so it neither misses nor repeats a change. When the server no longer
// keeps the history it needs, it lists again and says so.
//
// A session's page also polls its telemetry (/api/telemetry: its streams, packets and rates)
// about once a second while the session is live and the page is visible, and the board the
// packet rate of every session writing (/api/rates); leaving the view, the session ending or
// the tab being hidden stops it.
//
// Everything a view shows is in its URL (filters, columns, large type, the session shown), so
// a view can be shared. Session fields are only ever set as text, never as markup.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);

  /// Ended sessions shown; live rows shown (the page says how many more there are).
  const ENDED_SHOWN = 20;
  const LIVE_SHOWN = 500;
  /// Redraws at most this often however fast changes come.
  const RENDER_EVERY_MS = 250;
  /// Reconnect back-off when the server cannot be reached.
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 5000;
  /// How long a changed row stays highlighted.
  const FLASH_MS = 1500;
  /// How often a live session's telemetry is asked for: its rates are over whole seconds.
  const TELEMETRY_EVERY_MS = 1000;
  /// The stream `""` is the main stream.
  const MAIN_STREAM = 'main';

  const state = {
    view: 'board',
    filter: { dataSources: [], identifier: '', details: [] },
    columns: [],
    sessionKey: '',
    // The feed sequence everything shown reflects.
    sequence: 0,
    // Server clock minus this browser's clock, so durations tick right on a screen whose
    // clock is off.
    clockOffsetMs: 0,
    sources: new Map(),
    live: new Map(),
    moreLive: 0,
    ended: [],
    tree: null,
    treeKeys: new Set(),
    flashed: new Map(),
    tokens: false,
    events: null,
    retryMs: RETRY_FIRST_MS,
    retryTimer: 0,
    renderTimer: 0,
    treeTimer: 0,
    telemetry: null,
    // Session key → packets per second, of the sessions writing (the board's live table).
    rates: new Map(),
    telemetryTimer: 0,
    telemetryWanted: false,
    generation: 0,
  };

  // Counts for whoever watches the page (and the end-to-end tests): changes applied,
  // changes received twice (there should be none), listings loaded, reconnects.
  const stats = { applied: 0, duplicates: 0, listings: 0, reconnects: 0, lastSequence: 0 };
  // Whether a telemetry question (a session's, or the board's rates) is waiting to be asked.
  window.pitwallBoard = { stats, telemetryScheduled: () => state.telemetryTimer !== 0 };

  // ---- the URL ----

  function readUrl() {
    const params = new URLSearchParams(location.search);
    state.filter = {
      dataSources: params.getAll('data_source').flatMap(splitList),
      identifier: params.get('identifier') || '',
      details: params.getAll('detail').filter((d) => d.includes('=')),
    };
    state.columns = (params.get('columns') || '').split(',').map((c) => c.trim()).filter(Boolean);
    state.sessionKey = params.get('session') || '';
    state.view = state.sessionKey ? 'session' : 'board';
    setLargeType(params.get('tv') === '1');
  }

  function splitList(text) {
    return text.split(',').map((part) => part.trim()).filter(Boolean);
  }

  /// The filter as the API and the URL take it.
  function filterParams() {
    const params = new URLSearchParams();
    for (const dataSource of state.filter.dataSources) params.append('data_source', dataSource);
    if (state.filter.identifier) params.set('identifier', state.filter.identifier);
    for (const detail of state.filter.details) params.append('detail', detail);
    return params;
  }

  /// The URL of a view: the board with the current filter, or one session (keeping the
  /// filter, so that "back to the board" returns to the same view).
  function viewUrl(sessionKey) {
    const params = filterParams();
    if (state.columns.length) params.set('columns', state.columns.join(','));
    if (document.body.classList.contains('tv')) params.set('tv', '1');
    if (sessionKey) params.set('session', sessionKey);
    const query = params.toString();
    return query ? `/?${query}` : '/';
  }

  function go(url) {
    history.pushState(null, '', url);
    start();
  }

  // ---- loading and following ----

  /// Shows the view the URL names: lists it, then follows the feed after what it listed.
  function start() {
    readUrl();
    stopFollowing();
    state.generation += 1;
    // What is shown is the previous view until this one is listed: not live yet.
    setStatus('connecting', 'loading…');
    fillFilterForm();
    $('back').href = viewUrl('');
    load();
  }

  function stopFollowing() {
    if (state.events) state.events.close();
    state.events = null;
    clearTimeout(state.retryTimer);
    clearTimeout(state.treeTimer);
    stopTelemetry();
    state.telemetryWanted = false;
  }

  async function load() {
    const generation = state.generation;
    const url = state.view === 'session'
      ? `/api/tree?${new URLSearchParams({ session_key: state.sessionKey })}`
      : `/api/board?${filterParams()}&ended=${ENDED_SHOWN}`;
    let response;
    try {
      response = await fetch(url, { cache: 'no-store' });
    } catch (e) {
      return retryLater(generation, 'cannot reach the server; retrying');
    }
    if (generation !== state.generation) return;
    if (response.status === 401 || response.status === 403) return showSignIn(await reason(response));
    if (response.status === 503) return retryLater(generation, await reason(response));
    if (!response.ok) {
      showOnly(state.view === 'session' ? 'session-view' : 'board-view');
      setStatus('error', 'not shown');
      return notice(await reason(response));
    }
    const listed = await response.json();
    if (generation !== state.generation) return;
    stats.listings += 1;
    state.retryMs = RETRY_FIRST_MS;
    if (state.view === 'session') {
      takeTree(listed);
    } else {
      takeListing(listed);
    }
    state.sequence = listed.sequence;
    stats.lastSequence = listed.sequence;
    showOnly(state.view === 'session' ? 'session-view' : 'board-view');
    render();
    startTelemetry();
    if (listed.feed_unavailable) {
      setStatus('error', 'no live updates');
      notice(`Live updates are not available on this server: ${listed.feed_unavailable}`);
      return;
    }
    follow();
  }

  async function reason(response) {
    try {
      const body = await response.json();
      return body.error || response.statusText;
    } catch (e) {
      return `${response.status} ${response.statusText}`;
    }
  }

  function retryLater(generation, why) {
    if (generation !== state.generation) return;
    setStatus('offline', why);
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => {
      if (generation === state.generation) load();
    }, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
  }

  /// Opens the event stream after the sequence shown. The browser itself reconnects when the
  /// stream ends or the network drops, sending the last sequence it got (Last-Event-ID); the
  /// page steps in only when the server refused the stream.
  function follow() {
    const generation = state.generation;
    const params = state.view === 'board' ? filterParams() : new URLSearchParams();
    params.set('after', String(state.sequence));
    const events = new EventSource(`/api/events?${params}`);
    state.events = events;
    setStatus('connecting', 'connecting…');
    events.addEventListener('change', (message) => onChange(JSON.parse(message.data)));
    events.addEventListener('live', () => {
      state.retryMs = RETRY_FIRST_MS;
      setStatus('live', 'live');
    });
    events.addEventListener('cut-off', (message) => {
      stats.reconnects += 1;
      setStatus('connecting', 'fell behind; catching up');
      console.info(JSON.parse(message.data).reason);
    });
    events.addEventListener('closing', () => {
      stats.reconnects += 1;
      setStatus('connecting', 'server restarting; reconnecting');
    });
    const relist = (why) => {
      events.close();
      notice(`${why} The board was listed again, so what it shows is complete.`);
      load();
    };
    events.addEventListener('compacted', (message) => relist(
      'Changes were made while this board was away that the server no longer keeps (its history '
      + `now starts at sequence ${JSON.parse(message.data).first_kept}).`));
    events.addEventListener('ahead', (message) => relist(
      `The server's history ends at sequence ${JSON.parse(message.data).newest}, before what this `
      + 'board had seen (was its store replaced?).'));
    events.addEventListener('failed', (message) => {
      events.close();
      notice(`Live updates failed: ${JSON.parse(message.data).reason}`);
      retryLater(generation, 'live updates failed; retrying');
    });
    events.onerror = () => {
      if (generation !== state.generation) return;
      if (events.readyState === EventSource.CLOSED) {
        // Refused (starting, signed out, …): find out why before trying again.
        stats.reconnects += 1;
        state.events = null;
        probe(generation);
      } else {
        setStatus('connecting', 'reconnecting…');
      }
    };
  }

  /// After the server refused the stream: signs in, waits, or reconnects, as it answers.
  async function probe(generation) {
    let status = 0;
    try {
      const params = new URLSearchParams({ after: String(state.sequence) });
      status = (await fetch(`/api/events?${params}`, { method: 'HEAD', cache: 'no-store' })).status;
    } catch (e) {
      status = 0;
    }
    if (generation !== state.generation) return;
    if (status === 401 || status === 403) return load();
    if (status >= 200 && status < 300) return follow();
    setStatus('offline', status === 503 ? 'server starting; retrying' : 'cannot reach the server; retrying');
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => {
      if (generation === state.generation) probe(generation);
    }, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
  }

  /// One store position: every event of it, then its sequence.
  function onChange(change) {
    if (change.sequence <= state.sequence) {
      stats.duplicates += 1;
      return;
    }
    change.events.forEach((event, index) => {
      if (state.view === 'session') {
        touchTree(event);
      } else {
        applyToBoard(event, change.matching[index]);
      }
    });
    state.sequence = change.sequence;
    stats.applied += change.events.length;
    stats.lastSequence = change.sequence;
    scheduleRender();
  }

  // ---- the board ----

  function takeListing(listed) {
    state.clockOffsetMs = parseTime(listed.now) - Date.now();
    state.tokens = Boolean(listed.tokens);
    state.sources = new Map(listed.data_sources.map((s) => [s.data_source, { live: s.live, completed: s.completed }]));
    state.live = new Map(listed.live.map((s) => [s.session_key, s]));
    state.moreLive = listed.more_live;
    state.ended = listed.ended;
  }

  function applyToBoard(event, matching) {
    const session = event.session;
    const counts = state.sources.get(event.data_source) || { live: 0, completed: 0 };
    switch (event.kind) {
      case 'STARTED': counts.live += 1; break;
      case 'ENDED': counts.live -= 1; counts.completed += 1; break;
      case 'PURGED':
        if (session && session.is_complete) counts.completed -= 1; else counts.live -= 1;
        break;
      default: break;
    }
    if (counts.live + counts.completed > 0) {
      state.sources.set(event.data_source, counts);
    } else {
      state.sources.delete(event.data_source);
    }
    const key = event.session_key;
    const wasLive = state.live.delete(key);
    state.ended = state.ended.filter((s) => s.session_key !== key);
    // Past the listing's cap some live sessions are only counted: a change to a session the
    // page does not hold is one of those, until it ends.
    const uncounted = !wasLive && event.kind !== 'STARTED' && state.moreLive > 0;
    if (uncounted && event.kind === 'ENDED') state.moreLive -= 1;
    if (event.kind === 'PURGED' || !matching || !session) return;
    if (uncounted && !session.is_complete) return;
    if (session.is_complete) {
      state.ended.unshift(session);
      state.ended.sort((a, b) => parseTime(b.termination_time) - parseTime(a.termination_time));
      state.ended.length = Math.min(state.ended.length, ENDED_SHOWN);
    } else {
      state.live.set(key, session);
    }
    state.flashed.set(key, Date.now());
  }

  // ---- a session ----

  function takeTree(listed) {
    state.tree = listed.root;
    state.treeKeys = new Set();
    const walk = (node) => {
      state.treeKeys.add(node.session_key);
      node.children.forEach(walk);
      node.parents.forEach(walk);
    };
    walk(listed.root);
  }

  /// A change to a session of the tree (or one that names the root) redraws the tree.
  function touchTree(event) {
    const session = event.session;
    const names = session && session.associate_session_keys.some((key) => state.treeKeys.has(key));
    if (!state.treeKeys.has(event.session_key) && !names) return;
    clearTimeout(state.treeTimer);
    const generation = state.generation;
    state.treeTimer = setTimeout(async () => {
      try {
        const url = `/api/tree?${new URLSearchParams({ session_key: state.sessionKey })}`;
        const response = await fetch(url, { cache: 'no-store' });
        if (generation !== state.generation) return;
        if (response.status === 404) {
          notice('This session is gone: it was removed by retention.');
          return;
        }
        if (response.ok) {
          takeTree(await response.json());
          render();
        }
      } catch (e) {
        // The event stream reports an unreachable server; the next change retries.
      }
    }, 100);
  }

  // ---- telemetry: a session's streams, and the board's packet rates ----

  /// Shows the view's telemetry afresh and polls it: a session's while it is live, the
  /// board's rates while it is shown.
  function startTelemetry() {
    stopTelemetry();
    state.telemetry = null;
    state.rates = new Map();
    state.telemetryWanted = true;
    if (state.view === 'session') renderTelemetry();
    pollTelemetry(state.generation);
  }

  function stopTelemetry() {
    clearTimeout(state.telemetryTimer);
    state.telemetryTimer = 0;
  }

  /// One answer, then the next after a second while it is wanted. A timeout rather than an
  /// interval: a slow answer is never overtaken by the next question.
  async function pollTelemetry(generation) {
    let again = true;
    try {
      const url = state.view === 'session'
        ? `/api/telemetry?${new URLSearchParams({ session_key: state.sessionKey })}`
        : '/api/rates';
      const response = await fetch(url, { cache: 'no-store' });
      if (generation !== state.generation) return;
      if (response.ok) {
        const answer = await response.json();
        if (generation !== state.generation) return;
        if (state.view === 'session') {
          state.telemetry = answer;
          again = answer.live;
          renderTelemetry();
        } else {
          takeRates(answer.sessions);
        }
      } else {
        // Gone, or signed out (the event stream handles signing in): nothing to poll.
        again = response.status === 503;
      }
    } catch (e) {
      // Unreachable: the event stream says so; try again while the page is shown.
    }
    if (generation !== state.generation) return;
    state.telemetryWanted = again;
    if (!again || document.hidden) return;
    clearTimeout(state.telemetryTimer);
    state.telemetryTimer = setTimeout(() => {
      state.telemetryTimer = 0;
      pollTelemetry(generation);
    }, TELEMETRY_EVERY_MS);
  }

  /// A hidden tab asks for nothing; shown again, it catches up at once.
  function onVisibility() {
    if (document.hidden) {
      stopTelemetry();
    } else if (state.telemetryWanted) {
      stopTelemetry();
      pollTelemetry(state.generation);
    }
  }

  /// The board's rates, redrawn only when one changed: an idle data plane redraws nothing.
  function takeRates(sessions) {
    const rates = new Map(Object.entries(sessions));
    const same = rates.size === state.rates.size
      && [...rates].every(([key, rate]) => state.rates.get(key) === rate);
    state.rates = rates;
    if (!same) scheduleRender();
  }

  function renderTelemetry() {
    const telemetry = state.telemetry;
    const body = $('telemetry');
    const note = $('telemetry-note');
    if (!telemetry) {
      body.replaceChildren();
      note.textContent = 'Loading…';
      return;
    }
    const rows = telemetry.streams.map((stream) => {
      const row = document.createElement('tr');
      row.dataset.stream = stream.stream;
      const name = text(stream.stream || MAIN_STREAM, stream.stream ? 'stream' : 'stream main');
      if (!stream.stream) name.title = 'the main stream (no stream name)';
      const rate = text(formatRate(stream.packets_per_second), 'number rate');
      if (stream.packets_per_second > 0) rate.classList.add('has-live');
      row.append(name, text(wholeNumbers.format(stream.packets), 'number packets'), rate,
        text(formatBytes(stream.bytes), 'number wide'));
      return row;
    });
    if (!rows.length) {
      const row = document.createElement('tr');
      const cell = text(telemetry.live ? 'No packets written yet' : 'No packets written', 'empty');
      cell.colSpan = 4;
      row.append(cell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
    const since = `Counted since ${formatTime(telemetry.counted_since)} (when the server started)`;
    note.textContent = telemetry.live
      ? `${since}; rates over the last ${telemetry.window_seconds} s.`
      : `${since}. The session has ended.`;
  }

  const wholeNumbers = new Intl.NumberFormat(undefined);

  function rateCell(perSecond) {
    const cell = text(perSecond ? formatRate(perSecond) : '', 'number rate');
    if (perSecond) cell.classList.add('has-live');
    return cell;
  }

  function formatRate(perSecond) {
    if (perSecond >= 100) return wholeNumbers.format(Math.round(perSecond));
    return perSecond.toFixed(1);
  }

  function formatBytes(bytes) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let value = bytes;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  // ---- drawing ----

  function scheduleRender() {
    if (state.renderTimer) return;
    state.renderTimer = setTimeout(() => {
      state.renderTimer = 0;
      render();
    }, RENDER_EVERY_MS);
  }

  function render() {
    if (state.view === 'session') {
      renderSession();
    } else {
      renderBoard();
    }
    $('position').textContent = `Feed sequence ${state.sequence}`;
    $('sign-out').hidden = !state.tokens;
  }

  function renderBoard() {
    renderSources();
    const live = [...state.live.values()].sort((a, b) =>
      a.data_source.localeCompare(b.data_source) || parseTime(a.creation_time) - parseTime(b.creation_time));
    const hiddenLive = Math.max(0, live.length - LIVE_SHOWN) + state.moreLive;
    $('live-count').textContent = String(live.length + state.moreLive);
    const shown = live.slice(0, LIVE_SHOWN);
    // A packet rate column only while a session shown is writing: a board of sessions
    // alone keeps its width for details.
    const rated = shown.some((session) => state.rates.has(session.session_key));
    fillHead('live-head', ['Identifier', 'Data source', 'Type', 'Version', 'Started', 'Duration',
      ...(rated ? ['Pkt/s'] : [])]);
    fillRows('live', shown, (session) => [
      identifierCell(session),
      text(session.data_source, 'wide'),
      text(session.type, 'wide'),
      text(String(session.version), 'number wide'),
      timeCell(session.creation_time),
      durationCell(session.creation_time, null),
      ...(rated ? [rateCell(state.rates.get(session.session_key))] : []),
    ], 'No live sessions');
    $('live-more').hidden = hiddenLive === 0;
    $('live-more').textContent = `${hiddenLive} more live sessions are not shown; narrow the filter to see them.`;
    fillHead('ended-head', ['Identifier', 'Data source', 'Type', 'Started', 'Ended', 'Duration']);
    fillRows('ended', state.ended, (session) => [
      identifierCell(session),
      text(session.data_source, 'wide'),
      text(session.type, 'wide'),
      timeCell(session.creation_time, 'wide'),
      timeCell(session.termination_time),
      durationCell(session.creation_time, session.termination_time),
    ], 'Nothing has ended yet');
    const names = $('data-source-names');
    names.replaceChildren(...[...state.sources.keys()].map((name) => {
      const option = document.createElement('option');
      option.value = name;
      return option;
    }));
  }

  function renderSources() {
    const rows = [...state.sources.entries()].sort(([a], [b]) => a.localeCompare(b));
    const active = new Set(state.filter.dataSources);
    fillRows('sources', rows, ([name, counts]) => {
      const link = document.createElement('a');
      link.href = viewUrlWith({ dataSources: [name] });
      link.textContent = name;
      link.addEventListener('click', navigate);
      const cell = document.createElement('td');
      cell.append(link);
      const live = text(String(counts.live), 'number');
      if (counts.live > 0) live.classList.add('has-live');
      return [cell, live, text(String(counts.completed), 'number')];
    }, 'No sessions yet', ([name]) => (active.has(name) ? 'active' : ''));
  }

  function viewUrlWith(change) {
    const saved = state.filter;
    state.filter = { ...saved, ...change };
    const url = viewUrl('');
    state.filter = saved;
    return url;
  }

  /// The columns after the fixed ones: the chosen detail keys, or every detail in one cell.
  function fillHead(id, fixed) {
    const extra = state.columns.length ? state.columns : ['Details'];
    const row = document.createElement('tr');
    for (const title of [...fixed, ...extra]) {
      const cell = document.createElement('th');
      cell.textContent = title;
      if (['Type', 'Version', 'Data source'].includes(title)) cell.className = 'wide';
      if (title === 'Version' || title === 'Pkt/s') cell.classList.add('number');
      if (title === 'Pkt/s') cell.title = 'packets per second written for the session, over the last 5 s';
      row.append(cell);
    }
    $(id).replaceChildren(row);
  }

  function detailCells(session) {
    if (state.columns.length) {
      return state.columns.map((key) => text(session.details[key] ?? '', 'detail'));
    }
    const cell = document.createElement('td');
    cell.className = 'details';
    for (const [key, value] of Object.entries(session.details)) {
      const chip = document.createElement('span');
      chip.className = 'chip';
      chip.textContent = `${key}=${value}`;
      chip.title = chip.textContent;
      cell.append(chip);
    }
    return [cell];
  }

  function fillRows(id, items, cells, empty, rowClass) {
    const body = $(id);
    const now = Date.now();
    const rows = items.map((item) => {
      const row = document.createElement('tr');
      const session = item.session_key ? item : null;
      row.append(...cells(item));
      if (session) {
        row.append(...detailCells(session));
        row.dataset.key = session.session_key;
        row.classList.add('session-row');
        const flashed = state.flashed.get(session.session_key);
        if (flashed && now - flashed < FLASH_MS) row.classList.add('flash');
      }
      const extra = rowClass ? rowClass(item) : '';
      if (extra) row.classList.add(extra);
      return row;
    });
    if (!rows.length) {
      const row = document.createElement('tr');
      const cell = text(empty, 'empty');
      cell.colSpan = 12;
      row.append(cell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  function text(value, className) {
    const cell = document.createElement('td');
    cell.textContent = value;
    if (className) cell.className = className;
    return cell;
  }

  function identifierCell(session) {
    const cell = document.createElement('td');
    cell.className = 'identifier';
    cell.append(sessionLink(session.session_key, session.identifier || '(no identifier)'));
    return cell;
  }

  function sessionLink(key, label) {
    const link = document.createElement('a');
    link.href = viewUrl(key);
    link.textContent = label;
    link.addEventListener('click', navigate);
    return link;
  }

  function navigate(event) {
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    go(event.currentTarget.getAttribute('href'));
  }

  function timeCell(time, className) {
    const cell = text(formatTime(time), `time ${className || ''}`.trim());
    if (time) cell.title = new Date(parseTime(time)).toString();
    return cell;
  }

  function durationCell(from, to) {
    return setDuration(document.createElement('td'), from, to);
  }

  /// A duration from `from` to `to`, or ticking up to now while `to` is not set.
  function setDuration(element, from, to) {
    element.classList.add('duration');
    if (from) element.dataset.from = String(parseTime(from));
    if (to) element.dataset.to = String(parseTime(to));
    element.textContent = durationText(element);
    return element;
  }

  function durationText(cell) {
    if (!cell.dataset.from) return '';
    const to = cell.dataset.to ? Number(cell.dataset.to) : Date.now() + state.clockOffsetMs;
    return formatDuration(to - Number(cell.dataset.from));
  }

  function tick() {
    for (const cell of document.querySelectorAll('.duration[data-from]:not([data-to])')) {
      cell.textContent = durationText(cell);
    }
  }

  function renderSession() {
    const root = state.tree;
    const session = root.session;
    $('session-title').textContent = session.identifier || session.session_key;
    const fields = [
      ['Session key', session.session_key],
      ['Data source', session.data_source],
      ['Identifier', session.identifier],
      ['Type', session.type],
      ['Version', String(session.version)],
      ['UTC offset', session.utc_offset || ''],
      ['State', session.is_complete ? 'ended' : 'live'],
      ['Created', session.creation_time],
      ['Ended', session.termination_time],
      ['Duration', null],
      ['Last activity', session.last_activity_time],
      ['Offsets', Object.entries(session.topic_partition_offsets).map(([p, o]) => `${p} → ${o}`).join(', ')],
      ['Associates', session.associate_session_keys.join(', ') || '—'],
    ];
    const list = $('session-fields');
    list.replaceChildren(...fields.flatMap(([name, value]) => {
      const term = document.createElement('dt');
      term.textContent = name;
      const definition = document.createElement('dd');
      if (name === 'Duration') {
        setDuration(definition, session.creation_time, session.termination_time);
      } else if (['Created', 'Ended', 'Last activity'].includes(name)) {
        describeTime(definition, value);
      } else if (name === 'Data source') {
        const link = document.createElement('a');
        link.href = viewUrlWith({ dataSources: [value] });
        link.textContent = value;
        link.addEventListener('click', navigate);
        definition.append(link);
      } else {
        definition.textContent = value;
      }
      if (name === 'State') definition.className = session.is_complete ? 'state-ended' : 'state-live';
      return [term, definition];
    }));
    const details = Object.entries(session.details);
    fillRows('session-details', details, ([key, value]) => [text(key, 'key'), text(value, 'value')], 'No details');
    $('tree-parents').replaceChildren(treeList(root.parents, 'parents'));
    $('tree-children').replaceChildren(treeList(root.children, 'children'));
  }

  function treeList(nodes, direction) {
    const list = document.createElement('ul');
    list.className = 'tree-list';
    if (!nodes.length) {
      const item = document.createElement('li');
      item.className = 'empty';
      item.textContent = 'none';
      list.append(item);
      return list;
    }
    for (const node of nodes) {
      const item = document.createElement('li');
      item.dataset.key = node.session_key;
      if (node.session) {
        item.append(sessionLink(node.session_key, node.session.identifier || node.session_key));
        const about = document.createElement('span');
        about.className = 'about';
        about.textContent = ` ${node.session.data_source} · ${node.session.is_complete ? 'ended' : 'live'}`;
        item.append(about);
      } else {
        const missing = document.createElement('span');
        missing.className = 'missing';
        missing.textContent = `${node.session_key} (no such session)`;
        item.append(missing);
      }
      if (node.cycle) {
        const cycle = document.createElement('span');
        cycle.className = 'about';
        cycle.textContent = ' (already above: a cycle)';
        item.append(cycle);
      }
      const next = node[direction];
      if (next.length) item.append(treeList(next, direction));
      list.append(item);
    }
    return list;
  }

  // ---- times ----

  /// Milliseconds since the epoch of an RFC 3339 time (more than milliseconds are dropped).
  function parseTime(time) {
    if (!time) return NaN;
    return Date.parse(time.replace(/(\.\d{3})\d+/, '$1'));
  }

  const clock = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
  const day = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

  function formatTime(time) {
    const ms = parseTime(time);
    if (Number.isNaN(ms)) return '';
    const date = new Date(ms);
    const today = new Date().toDateString() === date.toDateString();
    return today ? clock.format(date) : `${day.format(date)} ${clock.format(date)}`;
  }

  /// A time in this browser's zone, with the exact UTC time the server gave under it.
  function describeTime(element, time) {
    const ms = parseTime(time);
    if (Number.isNaN(ms)) {
      element.textContent = '—';
      return;
    }
    const utc = document.createElement('span');
    utc.className = 'utc';
    utc.textContent = time;
    element.replaceChildren(new Date(ms).toLocaleString(), utc);
  }

  function formatDuration(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const days = Math.floor(total / 86400);
    const hours = Math.floor((total % 86400) / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const seconds = total % 60;
    const clockPart = `${hours}:${String(minutes).padStart(2, '0')}:${String(seconds).padStart(2, '0')}`;
    return days ? `${days}d ${clockPart}` : clockPart;
  }

  // ---- status, notices, large type, sign-in ----

  function setStatus(kind, label) {
    const status = $('status');
    status.dataset.state = kind;
    status.textContent = label;
  }

  function notice(message) {
    $('notice-text').textContent = message;
    $('notice').hidden = false;
  }

  function showOnly(id) {
    for (const view of ['board-view', 'session-view', 'sign-in-view']) $(view).hidden = view !== id;
    $('filters').hidden = id !== 'board-view';
  }

  function setLargeType(on) {
    document.body.classList.toggle('tv', on);
    $('large-type').setAttribute('aria-pressed', String(on));
  }

  function showSignIn(message) {
    stopFollowing();
    showOnly('sign-in-view');
    setStatus('offline', 'signed out');
    // A first visit needs no error; a sign-in this browser kept that is no longer accepted
    // (its token was removed from the server) says so.
    $('sign-in-error').textContent = message.includes('not known')
      ? 'The token this browser signed in with is no longer accepted; sign in again.'
      : '';
    state.tokens = true;
    $('sign-in').elements.token.focus();
  }

  async function signIn(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const token = form.elements.token.value.trim();
    const response = await fetch('/board/sign-in', {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded', 'X-Pitwall-Board': 'sign-in' },
      body: new URLSearchParams({ token }),
    });
    if (response.ok) {
      form.reset();
      $('sign-in-error').textContent = '';
      start();
    } else {
      $('sign-in-error').textContent = await reason(response);
    }
  }

  async function signOut() {
    await fetch('/board/sign-out', { method: 'POST', headers: { 'X-Pitwall-Board': 'sign-out' } });
    stopFollowing();
    state.tokens = false;
    showSignIn('');
  }

  function fillFilterForm() {
    const form = $('filters');
    form.elements.data_source.value = state.filter.dataSources.join(', ');
    form.elements.identifier.value = state.filter.identifier;
    form.elements.detail.value = state.filter.details.join('; ');
    form.elements.columns.value = state.columns.join(', ');
  }

  function applyFilters(event) {
    event.preventDefault();
    const form = event.currentTarget;
    state.filter = {
      dataSources: splitList(form.elements.data_source.value),
      identifier: form.elements.identifier.value.trim(),
      details: form.elements.detail.value.split(';').map((d) => d.trim()).filter((d) => d.includes('=')),
    };
    state.columns = splitList(form.elements.columns.value);
    go(viewUrl(''));
  }

  function init() {
    $('filters').addEventListener('submit', applyFilters);
    $('clear-filters').addEventListener('click', () => {
      state.filter = { dataSources: [], identifier: '', details: [] };
      go(viewUrl(''));
    });
    $('home').addEventListener('click', navigate);
    $('back').addEventListener('click', navigate);
    $('large-type').addEventListener('click', () => {
      setLargeType(!document.body.classList.contains('tv'));
      history.replaceState(null, '', viewUrl(state.view === 'session' ? state.sessionKey : ''));
    });
    $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
    $('sign-in').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', signOut);
    window.addEventListener('popstate', start);
    document.addEventListener('visibilitychange', onVisibility);
    setInterval(tick, 1000);
    start();
  }

  init();
})();
