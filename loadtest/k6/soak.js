// SB_VUS connections held for SB_DURATION: each subscribes to a room, pings every
// SB_PING_MS and publishes every SB_PUBLISH_MS. Any lost pong, server close or error frame
// fails the run.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, setInterval, clearInterval } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { VUS, DURATION, URL, durationMs, parse } from './common.js';

const PING_MS = parseInt(__ENV.SB_PING_MS || '5000', 10);
const PUBLISH_MS = parseInt(__ENV.SB_PUBLISH_MS || '10000', 10);
const ROOMS = parseInt(__ENV.SB_ROOMS || '10', 10);

const rtt = new Trend('sb_soak_ping_rtt_ms', true);
const pingsLost = new Counter('sb_soak_pings_lost');
const unexpectedClose = new Counter('sb_soak_unexpected_close');
const received = new Counter('sb_soak_messages');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    soak: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${Math.ceil(durationMs(DURATION) / 1000) + 30}s`,
    },
  },
  thresholds: {
    sb_soak_ping_rtt_ms: ['p(99)<100'],
    sb_soak_pings_lost: ['count==0'],
    sb_soak_unexpected_close: ['count==0'],
    sb_error_frames: ['count==0'],
  },
};

export default function () {
  const ws = new WebSocket(URL);
  const room = `k6-soak-${__VU % ROOMS}`;
  const pending = [];
  let closing = false;
  let timers = [];
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'subscribe', room }));
    } else if (m.type === 'subscribed') {
      timers.push(setInterval(() => {
        pending.push(Date.now());
        ws.send(JSON.stringify({ type: 'ping' }));
      }, PING_MS));
      timers.push(setInterval(() => {
        ws.send(JSON.stringify({ type: 'publish', room, data: { from: __VU, ts: Date.now() } }));
      }, PUBLISH_MS));
      setTimeout(() => {
        closing = true;
        timers.forEach((t) => clearInterval(t));
        // Whatever is still unanswered after a last grace second is lost.
        setTimeout(() => {
          pingsLost.add(pending.length);
          ws.close();
        }, 1000);
      }, durationMs(DURATION));
    } else if (m.type === 'pong') {
      const t = pending.shift();
      if (t !== undefined) rtt.add(Date.now() - t);
    } else if (m.type === 'message') {
      received.add(1);
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
  ws.onclose = () => {
    if (!closing) unexpectedClose.add(1);
  };
}
