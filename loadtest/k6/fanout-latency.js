// SB_VUS subscribers in one room; the first SB_PUBLISHERS VUs also publish every SB_INTERVAL_MS.
// Every subscriber measures delivery latency = receive time - the `ts` the publisher put in the
// payload (same machine, same clock). Thresholds on the latency Trend fail the run.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, setInterval, clearInterval } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { URL, VUS, DURATION, durationMs, parse } from './common.js';

const PUBLISHERS = parseInt(__ENV.SB_PUBLISHERS || '1', 10);
const INTERVAL_MS = parseInt(__ENV.SB_INTERVAL_MS || '100', 10);
const P99_MS = parseInt(__ENV.SB_P99_MS || '50', 10);
const ROOM = __ENV.SB_ROOM || 'k6-fanout';
// Subscribers wait this long for everyone to join before publishing starts.
const WARMUP_MS = parseInt(__ENV.SB_WARMUP_MS || '3000', 10);

const latency = new Trend('sb_fanout_latency_ms', true);
const delivered = new Counter('sb_delivered');
const published = new Counter('sb_published');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    fanout: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil((durationMs(DURATION) + WARMUP_MS) / 1000) + 20}s`,
    },
  },
  thresholds: {
    sb_fanout_latency_ms: [`p(99)<${P99_MS}`, 'p(50)<20'],
    sb_delivered: ['count>0'],
    sb_error_frames: ['count==0'],
  },
};

export default function () {
  const ws = new WebSocket(URL);
  let seq = 0;
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'subscribe', room: ROOM }));
    } else if (m.type === 'subscribed') {
      if (__VU <= PUBLISHERS) {
        setTimeout(() => {
          const timer = setInterval(() => {
            ws.send(JSON.stringify({ type: 'publish', room: ROOM, data: { seq: seq++, ts: Date.now(), from: __VU } }));
            published.add(1);
          }, INTERVAL_MS);
          setTimeout(() => clearInterval(timer), durationMs(DURATION));
        }, WARMUP_MS);
      }
      // Everyone stays until the publishers are done and the last messages arrived.
      setTimeout(() => ws.close(), WARMUP_MS + durationMs(DURATION) + 2000);
    } else if (m.type === 'message' && m.data && typeof m.data.ts === 'number') {
      latency.add(Date.now() - m.data.ts);
      delivered.add(1);
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
}
