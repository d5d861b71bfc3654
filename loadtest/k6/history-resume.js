// History resume: SB_VUS subscribers of one room with history (the server must keep history
// for it: SWITCHBOARD_ROOMS='[{"pattern":"bench-*","history_size":200}]'). VU 1 is the
// publisher. Everyone subscribes and remembers the room's epoch and the offset of the last
// message; the subscribers leave; the publisher sends SB_MESSAGES; everyone comes back at once
// with `subscribe {room, since: {offset, epoch}}` and must get exactly the missed messages, in
// offset order, before `subscribed` with `recovered: true`. The phases run on one schedule
// that setup() fixes for all VUs.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { URL, VUS, parse } from './common.js';

const MESSAGES = parseInt(__ENV.SB_MESSAGES || '100', 10);
const WARMUP = parseInt(__ENV.SB_WARMUP || '3', 10);
// Time for every VU to connect and subscribe before the warm-up.
const SETUP_MS = parseInt(__ENV.SB_SETUP_MS || '5000', 10);
// Time for every subscriber to be recovered after the resume.
const RESUME_TIMEOUT_MS = parseInt(__ENV.SB_RESUME_TIMEOUT_MS || '20000', 10);
const P99_MS = parseInt(__ENV.SB_P99_MS || '2000', 10);
// Gaps between the phases: warm-up -> leave -> gap -> resume.
const STEP_MS = 1500;

const resumeMs = new Trend('sb_resume_ms', true);
const replayed = new Counter('sb_replayed');
const recovered = new Counter('sb_recovered');
const notRecovered = new Counter('sb_not_recovered');
const missing = new Counter('sb_missing');
const duplicates = new Counter('sb_duplicates');
const wrongCount = new Counter('sb_wrong_replay_count');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    resume: {
      executor: 'per-vu-iterations',
      vus: Math.max(VUS, 2),
      iterations: 1,
      maxDuration: `${Math.ceil((SETUP_MS + 3 * STEP_MS + RESUME_TIMEOUT_MS) / 1000) + 20}s`,
    },
  },
  thresholds: {
    sb_recovered: ['count>0'],
    sb_not_recovered: ['count==0'],
    sb_missing: ['count==0'],
    sb_duplicates: ['count==0'],
    sb_wrong_replay_count: ['count==0'],
    sb_resume_ms: [`p(99)<${P99_MS}`],
    sb_error_frames: ['count==0'],
  },
};

// One schedule and one room for all VUs (each VU has its own init context).
export function setup() {
  const run = __ENV.SB_RUN_ID || `${Date.now()}`;
  return { room: __ENV.SB_ROOM || `bench-k6-${run}`, t0: Date.now() + SETUP_MS };
}

function at(t, fn) {
  setTimeout(fn, Math.max(0, t - Date.now()));
}

function publisher(data) {
  const ws = new WebSocket(URL);
  let seq = 0;
  const publish = (n) => {
    for (let i = 0; i < n; i++) {
      ws.send(JSON.stringify({ type: 'publish', room: data.room, data: { seq: seq++, ts: Date.now() } }));
    }
  };
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'subscribe', room: data.room }));
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  at(data.t0, () => publish(WARMUP));
  at(data.t0 + 2 * STEP_MS, () => publish(MESSAGES));
  at(data.t0 + 3 * STEP_MS + RESUME_TIMEOUT_MS, () => ws.close());
  ws.onerror = () => {};
}

function subscriber(data) {
  let epoch = null;
  let offset = 0;
  const first = new WebSocket(URL);
  first.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      first.send(JSON.stringify({ type: 'subscribe', room: data.room }));
    } else if (m.type === 'subscribed') {
      epoch = m.data.epoch;
      offset = m.data.offset || 0;
    } else if (m.type === 'message' && typeof m.offset === 'number') {
      offset = Math.max(offset, m.offset);
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  first.onerror = () => {};
  at(data.t0 + STEP_MS, () => first.close());
  at(data.t0 + 3 * STEP_MS, () => {
    const t = Date.now();
    const start = offset;
    const back = new WebSocket(URL);
    back.onmessage = (e) => {
      const m = parse(e.data, badFrames);
      if (!m) return;
      if (m.type === 'connected') {
        back.send(JSON.stringify({ type: 'subscribe', room: data.room, since: { offset, epoch } }));
      } else if (m.type === 'message') {
        replayed.add(1);
        if (m.offset === offset + 1) {
          offset = m.offset;
        } else if (m.offset > offset + 1) {
          missing.add(m.offset - offset - 1);
          offset = m.offset;
        } else {
          duplicates.add(1);
        }
      } else if (m.type === 'subscribed') {
        if (m.data.recovered === true) {
          recovered.add(1);
          resumeMs.add(Date.now() - t);
        } else {
          notRecovered.add(1);
        }
        if (offset - start !== MESSAGES) wrongCount.add(1);
        back.close();
      } else if (m.type === 'error') {
        errorFrames.add(1);
      }
    };
    back.onerror = () => {};
    at(t + RESUME_TIMEOUT_MS, () => back.close());
  });
}

export default function (data) {
  if (__VU === 1) {
    publisher(data);
  } else {
    subscriber(data);
  }
}
