// The shopper's page: a photo in, five lookalikes out; every result shown is an impression,
// every tap a click (and "×" a dismissal), sent to POST /v1/feedback so the loop learns.
'use strict';

const K = 5;
const UPLOAD_MAX_BYTES = 1536 * 1024; // larger photos are scaled down in the browser first
const UPLOAD_MAX_PX = 1280;

const $ = (id) => document.getElementById(id);
const session = (() => {
  let id = localStorage.getItem('lookalike-session');
  if (!id) {
    const rnd = (window.crypto && crypto.getRandomValues)
      ? Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, '0')).join('')
      : Math.random().toString(16).slice(2);
    id = 'web-' + rnd;
    localStorage.setItem('lookalike-session', id);
  }
  return id;
})();
$('session').textContent = 'session ' + session;

let queryUrl = null; // object URL of the shopper's photo

function setState(state, message, isError) {
  document.body.dataset.state = state;
  $('status').textContent = message || '';
  $('status').classList.toggle('error', !!isError);
}

function imageUrl(itemId) {
  return '/v1/items/' + encodeURIComponent(itemId) + '/image';
}

async function sendFeedback(events) {
  try {
    const response = await fetch('/v1/feedback', {
      method: 'POST', keepalive: true, headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user_id: session, events }),
    });
    if (!response.ok) console.warn('feedback refused', response.status, await response.text());
  } catch (err) {
    console.warn('feedback not sent', err);
  }
}

async function shrink(file) {
  // Phone photos are large: scale to UPLOAD_MAX_PX on the long side (the browser applies the
  // EXIF orientation when it draws). If the browser cannot decode it, send it as it is.
  if (file.size <= UPLOAD_MAX_BYTES || !window.createImageBitmap) return file;
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, UPLOAD_MAX_PX / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement('canvas');
    canvas.width = Math.round(bitmap.width * scale);
    canvas.height = Math.round(bitmap.height * scale);
    canvas.getContext('2d').drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return await new Promise((resolve) => canvas.toBlob((blob) => resolve(blob || file), 'image/jpeg', 0.9));
  } catch (err) {
    return file;
  }
}

async function ask(url, options) {
  const started = performance.now();
  let reply;
  try {
    const response = await fetch(url, options);
    reply = await response.json();
  } catch (err) {
    setState('error', 'The gateway could not be reached: ' + err.message, true);
    return null;
  }
  if (reply.status !== 'ok') {
    const error = reply.error || { code: 'internal', message: 'no reply' };
    setState('error', error.message + ' (' + error.code + ')', true);
    return null;
  }
  const pipeline = reply.timings_ms && reply.timings_ms.total;
  setState('ready', reply.results.length + ' lookalikes in ' + Math.round(performance.now() - started) + ' ms'
    + (pipeline ? ' (' + Math.round(pipeline) + ' ms in the pipeline)' : ''));
  return reply;
}

function showQuery(src, caption) {
  $('query-image').src = src;
  $('query-caption').textContent = caption;
  $('board').hidden = false;
}

function render(reply) {
  const list = $('results');
  list.replaceChildren();
  document.body.dataset.requestId = reply.request_id;
  reply.results.forEach((hit, i) => {
    const meta = hit.metadata || {};
    const title = meta.title || ('Item ' + hit.item_id);
    const li = document.createElement('li');
    li.className = 'result';
    li.dataset.itemId = hit.item_id;
    li.dataset.requestId = reply.request_id;

    const open = document.createElement('button');
    open.className = 'open';
    open.type = 'button';
    open.title = 'More like this';
    const img = document.createElement('img');
    img.src = imageUrl(hit.item_id);
    img.alt = title;
    img.loading = 'lazy';
    img.onerror = () => { img.removeAttribute('src'); img.classList.add('missing'); };
    const text = document.createElement('div');
    text.className = 'text';
    const name = document.createElement('div');
    name.className = 'title';
    name.textContent = title;
    const line = document.createElement('div');
    line.className = 'meta';
    const kind = document.createElement('span');
    kind.textContent = meta.articleType || '';
    const score = document.createElement('span');
    score.className = 'score';
    score.textContent = Number(hit.score).toFixed(3);
    line.append(kind, score);
    text.append(name, line);
    open.append(img, text);
    open.addEventListener('click', () => moreLike(hit, reply.request_id));

    const rank = document.createElement('span');
    rank.className = 'rank';
    rank.textContent = '#' + (i + 1);
    const dismiss = document.createElement('button');
    dismiss.className = 'dismiss';
    dismiss.type = 'button';
    dismiss.title = 'Not like my photo';
    dismiss.setAttribute('aria-label', 'Not like my photo: ' + title);
    dismiss.textContent = '×';
    dismiss.addEventListener('click', () => {
      li.classList.add('dismissed');
      sendFeedback([{ request_id: reply.request_id, item_id: hit.item_id, event: 'dismiss' }]);
    });
    li.append(open, rank, dismiss);
    list.append(li);
  });
  // Everything shown is an impression: the denominator of CTR@5.
  if (reply.results.length) {
    sendFeedback(reply.results.map((hit) => ({ request_id: reply.request_id, item_id: hit.item_id, event: 'impression' })));
  }
}

async function searchPhoto(file) {
  if (!file) return;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  showQuery(queryUrl, 'Your photo');
  $('results').replaceChildren();
  setState('loading', 'Looking…');
  const body = await shrink(file);
  const reply = await ask('/v1/similar?k=' + K, {
    method: 'POST', body, headers: { 'Content-Type': body.type || 'application/octet-stream' },
  });
  if (reply) render(reply);
}

async function moreLike(hit, requestId) {
  sendFeedback([{ request_id: requestId, item_id: hit.item_id, event: 'click' }]);
  showQuery(imageUrl(hit.item_id), 'More like: ' + ((hit.metadata && hit.metadata.title) || hit.item_id));
  $('results').replaceChildren();
  setState('loading', 'Looking…');
  window.scrollTo({ top: 0, behavior: 'smooth' });
  const reply = await ask('/v1/items/' + encodeURIComponent(hit.item_id) + '/similar?k=' + K);
  if (reply) render(reply);
}

for (const id of ['photo', 'camera']) {
  $(id).addEventListener('change', (event) => searchPhoto(event.target.files[0]));
}
const drop = $('drop');
['dragenter', 'dragover'].forEach((name) => document.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.add('over');
}));
['dragleave', 'drop'].forEach((name) => document.addEventListener(name, (event) => {
  event.preventDefault();
  drop.classList.remove('over');
}));
document.addEventListener('drop', (event) => {
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) searchPhoto(file);
});
