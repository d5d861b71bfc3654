// Presence churn: SB_WATCHERS watchers each `presence.watch` SB_WATCH of SB_CHURNERS users;
// each churner (its own ?user_id=) stays connected SB_ONLINE_MS, leaves for SB_AWAY_MS and
// comes back, for SB_DURATION. With SB_AWAY_MS longer than the server's
// presence_offline_grace (default 5 s) every leave gives its watchers `presence.offline` after
// the grace and `presence.online` on return; shorter leaves are blips the grace hides.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import exec from 'k6/execution';
import { DURATION, durationMs, urlWith, parse } from './common.js';

const WATCHERS = parseInt(__ENV.SB_WATCHERS || '200', 10);
const CHURNERS = parseInt(__ENV.SB_CHURNERS || '50', 10);
const WATCH = Math.min(parseInt(__ENV.SB_WATCH || '10', 10), CHURNERS);
const ONLINE_MS = parseInt(__ENV.SB_ONLINE_MS || '1000', 10);
const AWAY_MS = parseInt(__ENV.SB_AWAY_MS || '6000', 10);
const WARMUP_MS = parseInt(__ENV.SB_WARMUP_MS || '3000', 10);
const SPAN_MS = durationMs(DURATION);

const eventAge = new Trend('sb_presence_event_age_ms', true);
const offlineAfterLastSeen = new Trend('sb_presence_offline_after_last_seen_ms', true);
const online = new Counter('sb_presence_online');
const offline = new Counter('sb_presence_offline');
const cycles = new Counter('sb_churn_cycles');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    watchers: {
      executor: 'per-vu-iterations',
      exec: 'watcher',
      vus: WATCHERS,
      iterations: 1,
      maxDuration: `${Math.ceil((SPAN_MS + 2 * WARMUP_MS + AWAY_MS) / 1000) + 20}s`,
    },
    churners: {
      executor: 'per-vu-iterations',
      exec: 'churner',
      vus: CHURNERS,
      iterations: 1,
      startTime: `${WARMUP_MS}ms`,
      maxDuration: `${Math.ceil((SPAN_MS + AWAY_MS + ONLINE_MS) / 1000) + 20}s`,
    },
  },
  thresholds: {
    sb_presence_online: ['count>0'],
    sb_presence_event_age_ms: ['p(99)<100'],
    sb_error_frames: ['count==0'],
  },
};

export function setup() {
  return { run: __ENV.SB_RUN_ID || `${Date.now()}` };
}

const churnerId = (run, i) => `k6-${run}-c${i}`;

export function watcher(data) {
  const w = exec.scenario.iterationInTest;
  const ws = new WebSocket(urlWith({ user_id: `k6-${data.run}-w${w}` }));
  const userIds = [];
  for (let j = 0; j < WATCH; j++) userIds.push(churnerId(data.run, (w * WATCH + j) % CHURNERS));
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'presence.watch', user_ids: userIds }));
    } else if (m.type === 'presence.online' || m.type === 'presence.offline') {
      (m.type === 'presence.online' ? online : offline).add(1);
      if (typeof m.timestamp === 'number') eventAge.add(Date.now() - m.timestamp);
      const seen = m.data && Date.parse(m.data.last_seen);
      if (m.type === 'presence.offline' && !Number.isNaN(seen)) {
        offlineAfterLastSeen.add(Date.now() - seen);
      }
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
  setTimeout(() => ws.close(), 2 * WARMUP_MS + SPAN_MS + AWAY_MS);
}

export function churner(data) {
  const i = exec.scenario.iterationInTest;
  const end = Date.now() + SPAN_MS;
  const url = urlWith({ user_id: churnerId(data.run, i) });
  const connect = () => {
    const ws = new WebSocket(url);
    ws.onmessage = (e) => {
      const m = parse(e.data, badFrames);
      if (m && m.type === 'error') errorFrames.add(1);
    };
    ws.onopen = () => {
      setTimeout(() => {
        ws.close();
        // Only whole cycles: leave when the return still falls inside SB_DURATION.
        if (Date.now() + AWAY_MS <= end) {
          cycles.add(1);
          setTimeout(connect, AWAY_MS);
        }
      }, ONLINE_MS);
    };
    ws.onerror = () => {};
  };
  // Spread the churners over one cycle.
  setTimeout(connect, (i * (ONLINE_MS + AWAY_MS)) / CHURNERS);
}
