// Shared helpers for the Switchboard k6 scripts (k6/experimental/websockets).
// Every knob comes from the environment so the scripts run unchanged against any local server.

export const URL = __ENV.SB_URL || 'ws://127.0.0.1:8081/ws';
export const VUS = parseInt(__ENV.SB_VUS || '50', 10);
export const DURATION = __ENV.SB_DURATION || '30s';

// "30s" / "2m" / "500ms" -> milliseconds.
export function durationMs(d) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(String(d));
  if (!m) {
    throw new Error(`cannot parse duration ${d}`);
  }
  const mult = { ms: 1, s: 1000, m: 60000, h: 3600000 }[m[2]];
  return Math.round(parseFloat(m[1]) * mult);
}

// The URL with extra query parameters.
export function urlWith(params) {
  const q = Object.entries(params)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)
    .join('&');
  return q ? `${URL}${URL.includes('?') ? '&' : '?'}${q}` : URL;
}

// Parses a server frame; returns null (and counts it) when it is not JSON.
export function parse(data, badFrames) {
  try {
    return JSON.parse(data);
  } catch (e) {
    badFrames.add(1);
    return null;
  }
}
