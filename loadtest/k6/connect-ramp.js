// Ramp SB_VUS connections up over SB_DURATION; each connects, waits for `connected`,
// subscribes to one of SB_ROOMS rooms and holds the connection for SB_HOLD.
import { WebSocket } from 'k6/experimental/websockets';
import { setTimeout } from 'k6/timers';
import { Trend, Counter, Rate } from 'k6/metrics';
import { URL, VUS, DURATION, durationMs, parse } from './common.js';

const ROOMS = parseInt(__ENV.SB_ROOMS || '10', 10);
const HOLD = __ENV.SB_HOLD || '10s';

const connectMs = new Trend('sb_connect_ms', true);
const subscribeMs = new Trend('sb_subscribe_ms', true);
const subscribed = new Rate('sb_subscribed');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    ramp: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: DURATION, target: VUS },
        { duration: HOLD, target: VUS },
      ],
      gracefulRampDown: '5s',
      gracefulStop: '5s',
    },
  },
  thresholds: {
    sb_subscribed: ['rate>0.99'],
    sb_connect_ms: ['p(95)<1000'],
    sb_subscribe_ms: ['p(95)<500'],
    sb_error_frames: ['count==0'],
  },
};

export default function () {
  const t0 = Date.now();
  let tSub = 0;
  let ok = false;
  const ws = new WebSocket(URL);
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      connectMs.add(Date.now() - t0);
      tSub = Date.now();
      ws.send(JSON.stringify({ type: 'subscribe', room: `k6-ramp-${__VU % ROOMS}` }));
    } else if (m.type === 'subscribed') {
      subscribeMs.add(Date.now() - tSub);
      ok = true;
      setTimeout(() => ws.close(), durationMs(HOLD));
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
  ws.onclose = () => subscribed.add(ok);
}
