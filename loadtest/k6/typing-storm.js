// Typing storm: SB_VUS members of one room (each with its own ?user_id=); the first
// SB_TYPERS of them send `typing.start` every SB_RENEW_MS and every SB_STOP_EVERY-th time
// `typing.stop`. The server coalesces renewals (a start within typing_ttl sends nothing to the
// others), so only first starts and stops reach the other members. The counters show what
// the coalescing saved: sb_typing_frames_saved = renewals x (members - 1), and what should
// arrive: sb_typing_expected_start_events = first starts x (members - 1).
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout, setInterval, clearInterval } from 'k6/timers';
import { Trend, Counter } from 'k6/metrics';
import { VUS, DURATION, durationMs, urlWith, parse } from './common.js';

const TYPERS = parseInt(__ENV.SB_TYPERS || `${Math.max(1, Math.floor(VUS / 10))}`, 10);
const RENEW_MS = parseInt(__ENV.SB_RENEW_MS || '2000', 10);
const STOP_EVERY = parseInt(__ENV.SB_STOP_EVERY || '5', 10);
const WARMUP_MS = parseInt(__ENV.SB_WARMUP_MS || '3000', 10);

const eventAge = new Trend('sb_typing_event_age_ms', true);
const commands = new Counter('sb_typing_commands');
const firstStarts = new Counter('sb_typing_first_starts');
const renewals = new Counter('sb_typing_renewals');
const stops = new Counter('sb_typing_stops');
const saved = new Counter('sb_typing_frames_saved');
const expectedStarts = new Counter('sb_typing_expected_start_events');
const startEvents = new Counter('sb_typing_start_events');
const stopEvents = new Counter('sb_typing_stop_events');
const ownEvents = new Counter('sb_typing_own_events');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    typing: {
      executor: 'per-vu-iterations',
      vus: Math.max(VUS, 2),
      iterations: 1,
      maxDuration: `${Math.ceil((durationMs(DURATION) + WARMUP_MS) / 1000) + 20}s`,
    },
  },
  thresholds: {
    sb_typing_start_events: ['count>0'],
    sb_typing_own_events: ['count==0'],
    sb_typing_event_age_ms: ['p(99)<100'],
    sb_error_frames: ['count==0'],
  },
};

export function setup() {
  const run = __ENV.SB_RUN_ID || `${Date.now()}`;
  return { run, room: __ENV.SB_ROOM || `k6-typing-${run}` };
}

export default function (data) {
  const me = `k6-${data.run}-${__VU}`;
  const ws = new WebSocket(urlWith({ user_id: me }));
  const others = Math.max(VUS, 2) - 1;
  let typing = false;
  let round = 0;
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'subscribe', room: data.room }));
    } else if (m.type === 'subscribed') {
      if (__VU <= TYPERS) {
        // Typers start at different times within one renewal period.
        setTimeout(() => {
          const timer = setInterval(() => {
            round++;
            const stop = STOP_EVERY > 0 && round % STOP_EVERY === 0;
            if (stop && !typing) return;
            ws.send(JSON.stringify({ type: stop ? 'typing.stop' : 'typing.start', room: data.room }));
            commands.add(1);
            if (stop) {
              stops.add(1);
            } else if (typing) {
              renewals.add(1);
              saved.add(others);
            } else {
              firstStarts.add(1);
              expectedStarts.add(others);
            }
            typing = !stop;
          }, RENEW_MS);
          setTimeout(() => clearInterval(timer), durationMs(DURATION));
        }, WARMUP_MS + ((__VU * 7919) % RENEW_MS));
      }
      setTimeout(() => ws.close(), WARMUP_MS + RENEW_MS + durationMs(DURATION) + 2000);
    } else if (m.type === 'typing.start' || m.type === 'typing.stop') {
      (m.type === 'typing.start' ? startEvents : stopEvents).add(1);
      if (m.data && m.data.user_id === me) ownEvents.add(1);
      if (typeof m.timestamp === 'number') eventAge.add(Date.now() - m.timestamp);
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
}
