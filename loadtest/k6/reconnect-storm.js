// SB_VUS VUs connect, wait for `connected`, subscribe, and disconnect, over and over for
// SB_DURATION: the server must keep accepting and must clean up (check /health afterwards).
import { WebSocket } from 'k6/experimental/websockets';
import { Trend, Counter, Rate } from 'k6/metrics';
import { VUS, DURATION, URL, parse } from './common.js';

const cycleMs = new Trend('sb_reconnect_cycle_ms', true);
const success = new Rate('sb_reconnect_ok');
const badFrames = new Counter('sb_bad_frames');
const errorFrames = new Counter('sb_error_frames');

export const options = {
  scenarios: {
    storm: {
      executor: 'constant-vus',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '5s',
    },
  },
  thresholds: {
    sb_reconnect_ok: ['rate>0.99'],
    sb_reconnect_cycle_ms: ['p(95)<500'],
    sb_error_frames: ['count==0'],
  },
};

export default function () {
  const t0 = Date.now();
  let ok = false;
  const ws = new WebSocket(URL);
  ws.onmessage = (e) => {
    const m = parse(e.data, badFrames);
    if (!m) return;
    if (m.type === 'connected') {
      ws.send(JSON.stringify({ type: 'subscribe', room: `k6-storm-${__VU % 16}` }));
    } else if (m.type === 'subscribed') {
      ok = true;
      cycleMs.add(Date.now() - t0);
      ws.close();
    } else if (m.type === 'error') {
      errorFrames.add(1);
    }
  };
  ws.onerror = () => {};
  ws.onclose = () => success.add(ok);
}
