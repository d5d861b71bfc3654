// REST page reads (issue 13): setup() opens the conversation of k6-<run>-a with k6-<run>-b
// over REST and posts SB_MESSAGES messages into it; then GET
// /api/v1/messages/threads/:threadId/messages?limit=SB_LIMIT at SB_RATE requests per second
// (open loop: constant-arrival-rate), each answer checked for status 200, the page's shape and
// its number of messages. SB_WALK=1 makes every VU follow `next` (as `before`) down the thread
// and start again at the newest page. Needs the server's auth_mode none (X-User-Id).
import http from 'k6/http';
import { check } from 'k6';
import { Trend, Counter, Rate } from 'k6/metrics';
import { URL, VUS, DURATION } from './common.js';

// http://HOST:PORT of the server: SB_HTTP, or the host of SB_URL.
const BASE = __ENV.SB_HTTP || URL.replace(/^ws(s?):\/\/([^/]+).*$/, 'http$1://$2');
const RATE = parseInt(__ENV.SB_RATE || '500', 10);
const MESSAGES = parseInt(__ENV.SB_MESSAGES || '1000', 10);
const LIMIT = parseInt(__ENV.SB_LIMIT || '50', 10);
const WALK = __ENV.SB_WALK === '1';
const P99_MS = parseInt(__ENV.SB_P99_MS || '50', 10);
// Requests posted at once while setting up the thread.
const SETUP_BATCH = 50;

const pageMs = new Trend('sb_rest_page_ms', true);
const pageOk = new Rate('sb_rest_page_ok');
const pages = new Counter('sb_rest_pages');
const badPages = new Counter('sb_rest_bad_pages');

export const options = {
  setupTimeout: '120s',
  scenarios: {
    read: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 4,
    },
  },
  thresholds: {
    sb_rest_page_ok: ['rate>0.999'],
    sb_rest_pages: ['count>0'],
    sb_rest_page_ms: [`p(99)<${P99_MS}`, 'p(50)<20'],
    'http_req_failed{name:page}': ['rate<0.001'],
    // Requests the arrival rate wanted but no VU was free for (the server is too slow).
    dropped_iterations: ['count==0'],
  },
};

export function setup() {
  const run = __ENV.SB_RUN_ID || `${Date.now()}`;
  const user = `k6-${run}-a`;
  const headers = { 'X-User-Id': user, 'Content-Type': 'application/json' };
  const t = http.post(`${BASE}/api/v1/messages/threads`,
    JSON.stringify({ participants: [`k6-${run}-b`] }), { headers, tags: { name: 'setup' } });
  if (t.status !== 201 && t.status !== 200) {
    throw new Error(`POST /api/v1/messages/threads: ${t.status} ${t.body} (auth_mode none?)`);
  }
  const path = `${BASE}/api/v1/messages/threads/${encodeURIComponent(t.json('id'))}/messages`;
  for (let i = 0; i < MESSAGES; i += SETUP_BATCH) {
    const batch = [];
    for (let k = i; k < Math.min(MESSAGES, i + SETUP_BATCH); k++) {
      const body = JSON.stringify({ content: `m${k}`, clientMsgId: `k6-${run}-${k}` });
      batch.push(['POST', path, body, { headers, tags: { name: 'setup' } }]);
    }
    for (const r of http.batch(batch)) {
      if (r.status !== 201 && r.status !== 200) {
        throw new Error(`POST ${path}: ${r.status} ${r.body}`);
      }
    }
  }
  return { user, path };
}

// --walk: this VU's `before` for its next request (null: the newest page).
let before = null;

// Messages the page below `b` must hold, and whether a `next` must follow (seq 1..MESSAGES).
function expected(b) {
  const below = b === null ? MESSAGES : Math.min(b - 1, MESSAGES);
  return { count: Math.min(LIMIT, below), more: below > LIMIT };
}

export default function (data) {
  const asked = WALK ? before : null;
  const q = asked === null ? `?limit=${LIMIT}` : `?limit=${LIMIT}&before=${asked}`;
  const r = http.get(`${data.path}${q}`, {
    headers: { 'X-User-Id': data.user },
    tags: { name: 'page' },
  });
  pages.add(1);
  pageMs.add(r.timings.duration);
  const body = typeof r.body === 'string' ? r.body : '';
  const tail = /\],"next":(null|\d+)\}$/.exec(body);
  const want = expected(asked);
  const ok = check(r, {
    'status 200': (x) => x.status === 200,
    'page shape': () => body.startsWith('{"messages":[') && tail !== null,
    'page size': () => body.split('"serverMsgId":').length - 1 === want.count,
    'next as the thread says': () => tail !== null && (tail[1] !== 'null') === want.more,
  });
  pageOk.add(ok);
  if (!ok) {
    badPages.add(1);
    before = null;
    return;
  }
  before = tail[1] === 'null' ? null : parseInt(tail[1], 10);
}
