// The operator console: reads and acts through convoq's JSON API (same origin, session cookie).
// Every value from the server goes into the page as text, never as markup.
'use strict';

const $ = (sel) => document.querySelector(sel);
const POLL_MS = 2000;
const HISTORY_MS = 5 * 60 * 1000;
const PAGE_SIZE = 20;

let csrf = null;
let pollTimer = null;
const history = new Map(); // queue -> [{t, completed, failed}]
const jobsView = { offset: 0 };
let shownJob = null;
let jobEvents = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined) continue;
    if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'onclick') node.addEventListener('click', v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ''));
  return node;
}

function say(text, isError) {
  const m = $('#message');
  m.textContent = text;
  m.className = isError ? 'error' : '';
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (csrf && method !== 'GET') headers['X-CSRF-Token'] = csrf;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, {
    method, headers, credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let json = null;
  try { json = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const err = new Error(json && json.error ? json.error.message : `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return json;
}

// ---- session ----

async function boot() {
  try {
    const s = await api('GET', '/ui/session');
    csrf = s.csrf;
    $('#who').textContent = s.protectedMode ? 'protected mode (loopback admin)' : `logged in as ${s.name}`;
    $('#who').hidden = false;
    $('#logout').hidden = s.protectedMode;
    $('#login').hidden = true;
    $('#app').hidden = false;
    say('');
    startPolling();
  } catch (e) {
    if (e.status === 401) {
      $('#app').hidden = true;
      $('#login').hidden = false;
      $('#key').focus();
    } else {
      say(`cannot open the console: ${e.message}`, true);
    }
  }
}

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const key = $('#key').value;
  $('#key').value = '';
  try {
    await api('POST', '/ui/login', { key });
    await boot();
  } catch (e) {
    say(`login refused: ${e.message}`, true);
  }
});

$('#logout').addEventListener('click', async () => {
  try { await api('POST', '/ui/logout'); } catch (_) { /* the session is gone either way */ }
  csrf = null;
  clearTimeout(pollTimer);
  $('#who').hidden = true;
  $('#logout').hidden = true;
  await boot();
});

// ---- overview ----

function startPolling() {
  clearTimeout(pollTimer);
  const tick = async () => {
    try {
      await refreshQueues();
    } catch (e) {
      if (e.status === 401) { await boot(); return; }
      say(`reading the queues failed: ${e.message}`, true);
    }
    pollTimer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function chart(points) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('class', 'chart');
  svg.setAttribute('viewBox', '0 0 160 32');
  svg.setAttribute('role', 'img');
  const rates = [];
  for (let i = 1; i < points.length; i++) {
    const dt = (points[i].t - points[i - 1].t) / 60000;
    if (dt <= 0) continue;
    rates.push({
      t: points[i].t,
      done: Math.max(0, points[i].completed - points[i - 1].completed) / dt,
      fail: Math.max(0, points[i].failed - points[i - 1].failed) / dt,
    });
  }
  const top = Math.max(1, ...rates.map((r) => r.done + r.fail));
  const now = Date.now();
  const x = (t) => (160 * (1 - (now - t) / HISTORY_MS)).toFixed(1);
  const y = (v) => (31 - (30 * v) / top).toFixed(1);
  for (const [key, cls] of [['done', 'done'], ['fail', 'fail']]) {
    const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
    line.setAttribute('class', cls);
    line.setAttribute('points', rates.map((r) => `${x(r.t)},${y(r[key])}`).join(' '));
    svg.append(line);
  }
  const last = rates[rates.length - 1];
  svg.setAttribute('aria-label', last
    ? `last reading: ${Math.round(last.done)} completed and ${Math.round(last.fail)} failed per minute`
    : 'collecting readings');
  return svg;
}

function age(ms) {
  if (ms === null || ms === undefined) return '–';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7200000) return `${Math.round(ms / 60000)} min`;
  return `${(ms / 3600000).toFixed(1)} h`;
}

function rememberTotals(q, t) {
  // A page that opens now starts from the server's readings of the last minutes.
  const points = history.get(q.name)
    || (q.history || []).map((h) => ({ t: h.at, completed: h.completed, failed: h.failed }));
  points.push({ t, completed: q.totals.completed, failed: q.totals.failed });
  while (points.length && t - points[0].t > HISTORY_MS) points.shift();
  history.set(q.name, points);
  return points;
}

async function refreshQueues() {
  const fresh = $('#fresh').checked ? '?fresh=true' : '';
  const data = await api('GET', `/api/queues${fresh}`);
  const now = Date.now();
  const body = $('#queues tbody');
  body.replaceChildren();
  let oldest = 0;
  const select = $('#jobs-queue');
  if (!select.options.length) {
    for (const q of data.queues) select.append(el('option', {}, q.name));
  }
  for (const q of data.queues) {
    oldest = Math.max(oldest, q.countsAgeMs || 0);
    const points = rememberTotals(q, now);
    const first = points[0];
    const done = q.totals.completed - first.completed;
    const failed = q.totals.failed - first.failed;
    const rate = done + failed > 0 ? `${((100 * failed) / (done + failed)).toFixed(1)} %` : '–';
    const count = (state) => el('td', { dataset: { count: state } }, q.counts[state]);
    const action = q.paused ? 'resume' : 'pause';
    body.append(el('tr', { id: `queue-${q.name}` },
      el('th', { scope: 'row' }, q.name),
      el('td', { class: q.paused ? 'paused' : '', dataset: { paused: String(q.paused) } },
        q.paused ? 'paused' : 'running'),
      count('waiting'), count('active'), count('delayed'), count('completed'), count('failed'),
      el('td', {}, q.throughputPerMinute), el('td', {}, rate),
      el('td', { dataset: { recent: String(q.recent.jobs) } },
        q.recent.jobs ? `${q.recent.meanMs} / ${q.recent.p95Ms}` : '–'),
      el('td', { dataset: { oldest: String(q.oldestWaitingAgeMs ?? '') } }, age(q.oldestWaitingAgeMs)),
      el('td', {}, chart(points)),
      el('td', {},
        el('button', { type: 'button', 'data-action': action,
          onclick: () => queueAction(q.name, action) }, action === 'pause' ? 'Pause' : 'Resume'),
        ' ',
        el('button', { type: 'button', 'data-show': 'failed', onclick: () => showJobs(q.name, 'failed', 0) }, 'Failed jobs'),
        ' ',
        el('button', { type: 'button', 'data-show': 'active', onclick: () => showJobs(q.name, 'active', 0) }, 'Active jobs')),
    ));
  }
  const at = new Date(now);
  $('#read-at').textContent = at.toLocaleTimeString();
  $('#read-at').setAttribute('datetime', at.toISOString());
  $('#counts-age').textContent = `(counts at most ${oldest} ms old when read)`;
}

async function queueAction(name, action) {
  if (action === 'pause' && !confirm(`Pause queue ${name}? Its workers stop taking jobs.`)) return;
  try {
    await api('POST', `/api/queues/${encodeURIComponent(name)}/${action}`);
    say(`queue ${name} ${action === 'pause' ? 'paused' : 'resumed'}`);
    await refreshQueues();
  } catch (e) {
    say(`${action} ${name} failed: ${e.message}`, true);
  }
}

// ---- jobs ----

// An active job's lease: when it runs out, or that it has and the job waits for the stall
// sweep (which takes it back for another worker).
function leaseCell(j) {
  if (!j.leaseExpiresAt) return el('td', {}, '');
  const left = new Date(j.leaseExpiresAt) - Date.now();
  const by = j.leaseHolder ? ` by ${j.leaseHolder}` : '';
  return j.leaseExpired
    ? el('td', { class: 'failed', dataset: { lease: 'expired' } }, `expired ${age(-left)} ago (held${by}): waiting for the sweep`)
    : el('td', { dataset: { lease: 'held' } }, `held${by}, ${age(left)} left`);
}

function jobsQuery(state, offset) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset) });
  const q = $('#jobs-q').value.trim();
  const field = $('#jobs-field').value.trim();
  const value = $('#jobs-value').value;
  const stalled = $('#jobs-stalled').checked;
  const searching = q !== '' || field !== '' || stalled;
  if (q) params.set('q', q);
  if (stalled) params.set('stalled', 'true');
  if (field) { params.set('field', field); params.set('value', value); }
  if (state !== 'any' || !searching) params.set('state', state === 'any' ? 'waiting' : state);
  return params;
}

function jobRow(j) {
  return el('tr', {},
    el('td', {}, el('input', { type: 'checkbox', class: 'pick', 'data-id': j.id, 'aria-label': `select ${j.id}` })),
    el('td', {}, el('a', { href: '#', class: 'job-link', onclick: (ev) => { ev.preventDefault(); showJob(j.id); } }, j.id)),
    el('td', {}, j.name), el('td', {}, j.state),
    el('td', {}, `${j.attemptsMade} / ${j.maxAttempts}`), el('td', {}, j.createdAt),
    el('td', {}, j.requestId ?? ''), leaseCell(j), el('td', {}, j.stalledCount ?? ''),
    el('td', { class: 'failed' }, j.failedReason ?? ''));
}

// Every job of one request, in every queue: the HTTP request's job and the jobs it led to (the
// audit job, where the queue is apart from the store).
async function showRequest(requestId) {
  try {
    const found = [];
    let exhaustive = true;
    for (const option of $('#jobs-queue').options) {
      const params = new URLSearchParams({ q: requestId, limit: '100' });
      const data = await api('GET', `/api/queues/${encodeURIComponent(option.value)}/jobs?${params}`);
      found.push(...data.jobs);
      exhaustive = exhaustive && data.exhaustive !== false;
    }
    $('#jobs tbody').replaceChildren(...found.map(jobRow));
    $('#jobs-page').textContent = `${found.length} job${found.length === 1 ? '' : 's'} of request ${requestId}, every queue`;
    $('#jobs-note').textContent = exhaustive ? '' : 'This engine searched the newest 10,000 jobs of each state only.';
    $('#jobs-title').scrollIntoView();
  } catch (e) {
    say(`finding the request's jobs failed: ${e.message}`, true);
  }
}

async function showJobs(queue, state, offset) {
  $('#jobs-queue').value = queue;
  $('#jobs-state').value = state;
  jobsView.offset = Math.max(0, offset);
  try {
    const data = await api('GET',
      `/api/queues/${encodeURIComponent(queue)}/jobs?${jobsQuery(state, jobsView.offset)}`);
    const body = $('#jobs tbody');
    body.replaceChildren(...data.jobs.map(jobRow));
    $('#jobs-page').textContent = data.jobs.length
      ? `${jobsView.offset + 1}–${jobsView.offset + data.jobs.length}`
      : 'none';
    $('#jobs-note').textContent = data.exhaustive === false
      ? 'This engine searched the newest 10,000 jobs of each state only.'
      : '';
  } catch (e) {
    say(`listing jobs failed: ${e.message}`, true);
  }
}

$('#jobs-all').addEventListener('change', (ev) => {
  for (const box of document.querySelectorAll('#jobs tbody input.pick')) box.checked = ev.target.checked;
});

async function bulk(action, scope) {
  const queue = $('#jobs-queue').value;
  const state = $('#jobs-state').value;
  let body;
  let what;
  if (scope === 'selected') {
    const ids = [...document.querySelectorAll('#jobs tbody input.pick:checked')].map((b) => b.dataset.id);
    if (!ids.length) { say('select jobs first', true); return; }
    body = { action, ids };
    what = `${ids.length} selected job${ids.length === 1 ? '' : 's'}`;
  } else {
    const filter = { state };
    const q = $('#jobs-q').value.trim();
    const field = $('#jobs-field').value.trim();
    if (q) filter.q = q;
    if (field) { filter.field = field; filter.value = $('#jobs-value').value; }
    if ($('#jobs-stalled').checked) filter.stalled = 'true';
    body = { action, filter };
    what = `every ${state} job of ${queue}${q || field ? ' that the search matches' : ''}`;
  }
  const verbs = { retry: ['Retry', 'retried'], remove: ['Remove', 'removed'], promote: ['Promote', 'promoted'] };
  if (!confirm(`${verbs[action][0]} ${what}?`)) return;
  try {
    const r = await api('POST', `/api/queues/${encodeURIComponent(queue)}/jobs/bulk`, body);
    const verb = verbs[action][1];
    say(`${verb} ${r.done} of ${r.matched}${r.errors.length ? ` (${r.errors.map((e) => `${e.id}: ${e.message}`).join('; ')})` : ''}${r.more ? '; more match: run it again' : ''}`);
    await showJobs(queue, state, 0);
  } catch (e) {
    say(`${action} failed: ${e.message}`, true);
  }
}

for (const button of document.querySelectorAll('#bulk button')) {
  button.addEventListener('click', () => bulk(button.dataset.bulk, button.dataset.scope));
}

$('#jobs-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  showJobs($('#jobs-queue').value, $('#jobs-state').value, 0);
});
$('#jobs-prev').addEventListener('click', () =>
  showJobs($('#jobs-queue').value, $('#jobs-state').value, jobsView.offset - PAGE_SIZE));
$('#jobs-next').addEventListener('click', () =>
  showJobs($('#jobs-queue').value, $('#jobs-state').value, jobsView.offset + PAGE_SIZE));

// ---- one job ----

function field(name, value, label) {
  return [el('dt', {}, label || name), el('dd', { dataset: { field: name } }, value ?? '–')];
}

function renderJob(job) {
  shownJob = job;
  $('#job-fields').replaceChildren(
    ...field('id', job.id), ...field('queue', job.queue), ...field('name', job.name),
    ...field('state', job.state), ...field('attempts', `${job.attemptsMade} / ${job.maxAttempts}`),
    ...field('request id', job.requestId
      ? el('a', { href: '#', id: 'job-request', onclick: (ev) => { ev.preventDefault(); showRequest(job.requestId); } }, job.requestId)
      : undefined),
    ...field('created', job.createdAt),
    ...field('processed', job.processedAt), ...field('finished', job.finishedAt),
    ...field('result', job.result === undefined ? undefined : JSON.stringify(job.result)),
    ...field('data', job.data === undefined ? undefined : JSON.stringify(job.data)),
    ...field('options', job.opts === undefined ? undefined : JSON.stringify(job.opts)),
    // A job retried after a failure keeps the reason of its last failure.
    ...field('failure', job.failedReason, job.state === 'failed' ? 'failure' : 'last failure'));
}

async function showJob(id) {
  if (jobEvents) { jobEvents.close(); jobEvents = null; }
  try {
    const { job } = await api('GET', `/api/jobs/${encodeURIComponent(id)}`);
    renderJob(job);
    $('#find-id').value = job.id;
    $('#job').hidden = false;
    followEvents(job.id);
  } catch (e) {
    $('#job').hidden = true;
    say(e.status === 404 ? `no job ${id}` : `reading job ${id} failed: ${e.message}`, true);
  }
}

function followEvents(id) {
  const list = $('#job-events');
  list.replaceChildren();
  let previous = null;
  jobEvents = new EventSource(`/api/jobs/${encodeURIComponent(id)}/events`);
  const add = (ev) => {
    let e = {};
    try { e = JSON.parse(ev.data); } catch (_) { /* keep the kind */ }
    const at = e.at ? new Date(e.at) : null;
    const gap = at && previous ? ` (+${at - previous} ms)` : '';
    if (at) previous = at;
    const detail = e.detail === undefined ? ''
      : `: ${typeof e.detail === 'string' ? e.detail : JSON.stringify(e.detail)}`;
    list.append(el('li', { dataset: { kind: ev.type } },
      `${ev.type}${at ? ` at ${at.toISOString()}` : ''}${gap}${e.attempt ? `, attempt ${e.attempt}` : ''}${detail}`));
    if (ev.type === 'completed' || ev.type === 'failed') refreshJobFields(id);
  };
  for (const kind of ['waiting', 'delayed', 'active', 'stalled', 'retrying', 'completed', 'failed']) {
    jobEvents.addEventListener(kind, add);
  }
  // The server ends the stream after the job's last end; an EventSource would reconnect and
  // replay it all, so the end (or a broken stream) closes it. Finding the job again reopens it.
  jobEvents.addEventListener('error', () => { if (jobEvents) { jobEvents.close(); jobEvents = null; } });
}

async function refreshJobFields(id) {
  if (!shownJob || shownJob.id !== id) return;
  try {
    const { job } = await api('GET', `/api/jobs/${encodeURIComponent(id)}`);
    if (shownJob && shownJob.id === id) renderJob(job);
  } catch (_) { /* the next action says */ }
}

$('#find-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  showJob($('#find-id').value.trim());
});

$('#job-retry').addEventListener('click', async () => {
  if (!shownJob) return;
  try {
    await api('POST', `/api/jobs/${encodeURIComponent(shownJob.id)}/retry`);
    say(`job ${shownJob.id} retried`);
    await showJob(shownJob.id);
  } catch (e) {
    say(`retry failed: ${e.message}`, true);
  }
});

$('#job-promote').addEventListener('click', async () => {
  if (!shownJob) return;
  try {
    await api('POST', `/api/jobs/${encodeURIComponent(shownJob.id)}/promote`);
    say(`job ${shownJob.id} promoted: ready now`);
    await showJob(shownJob.id);
  } catch (e) {
    say(`promote failed: ${e.message}`, true);
  }
});

$('#job-remove').addEventListener('click', async () => {
  if (!shownJob || !confirm(`Remove job ${shownJob.id}? This cannot be undone.`)) return;
  try {
    await api('DELETE', `/api/jobs/${encodeURIComponent(shownJob.id)}`);
    say(`job ${shownJob.id} removed`);
    $('#job').hidden = true;
    shownJob = null;
  } catch (e) {
    say(`remove failed: ${e.message}`, true);
  }
});

boot();
