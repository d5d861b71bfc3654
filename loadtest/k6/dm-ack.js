// Pairs of users (VU 2k-1 and 2k) send each other direct messages every SB_INTERVAL_MS:
// message.send -> message.ack round trip, and message.send -> message.create at the partner.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, setInterval, clearInterval } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { VUS, DURATION, durationMs, urlWith, parse } from './common.js';

const INTERVAL_MS = parseInt(__ENV.SB_INTERVAL_MS || '200', 10);

const ackMs = new Trend('sb_dm_ack_ms', true);
const createMs = new Trend('sb_dm_create_ms', true);
const sent = new Counter('sb_dm_sent');
const acks = new Counter('sb_dm_acks');
const creates = new Counter('sb_dm_creates');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    dm: {
      executor: 'per-vu-iterations',
      vus: VUS % 2 === 0 ? VUS : VUS + 1,
      iterations: 1,
      maxDuration: `${Math.ceil(durationMs(DURATION) / 1000) + 30}s`,
    },
  },
  thresholds: {
    sb_dm_ack_ms: ['p(99)<100'],
    sb_dm_create_ms: ['p(99)<100'],
    sb_dm_acks: ['count>0'],
    sb_dm_creates: ['count>0'],
    sb_error_frames: ['count==0'],
  },
};

// One run id for all VUs (each VU has its own init context, so it must come from setup()),
// so that user ids are fresh per run and never hit the server's dedup window.
export function setup() {
  return { run: __ENV.SB_RUN_ID || `${Date.now()}` };
}

export default function (data) {
  const me = `k6-${data.run}-${__VU}`;
  const partner = `k6-${data.run}-${__VU % 2 === 1 ? __VU + 1 : __VU - 1}`;
  const ws = new WebSocket(urlWith({ user_id: me }));
  const sentAt = {};
  let seq = 0;
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      // Give the partner time to connect, then send for SB_DURATION.
      setTimeout(() => {
        const timer = setInterval(() => {
          const id = `${me}-${seq++}`;
          sentAt[id] = Date.now();
          ws.send(JSON.stringify({ type: 'message.send', clientMsgId: id, to: partner, content: `t=${Date.now()}` }));
          sent.add(1);
        }, INTERVAL_MS);
        setTimeout(() => clearInterval(timer), durationMs(DURATION));
        setTimeout(() => ws.close(), durationMs(DURATION) + 2000);
      }, 2000);
    } else if (m.type === 'message.ack') {
      const t = sentAt[m.data.clientMsgId];
      if (t !== undefined) {
        ackMs.add(Date.now() - t);
        delete sentAt[m.data.clientMsgId];
      }
      acks.add(1);
    } else if (m.type === 'message.create') {
      const t = parseInt(String(m.data.content).replace('t=', ''), 10);
      if (!Number.isNaN(t)) createMs.add(Date.now() - t);
      creates.add(1);
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
}
