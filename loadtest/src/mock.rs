//! Test only: a tiny blocking WebSocket server with the typing and presence semantics of
//! issue 10 (coalesced `typing.start` within a TTL, `typing.stop`, presence online on the
//! first device, offline only after a grace without a return), so the typing-storm and
//! presence-churn scenarios can be checked end to end before the real services exist. One
//! thread per connection; not a model of the server's performance.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Default)]
struct State {
    next_id: u64,
    writers: HashMap<u64, TcpStream>,
    rooms: HashMap<String, HashSet<u64>>,
    /// (connection, room) -> last start.
    typing: HashMap<(u64, String), Instant>,
    user_of: HashMap<u64, String>,
    devices: HashMap<String, u32>,
    online: HashSet<String>,
    /// Users whose last device left at this time (offline once the grace passed).
    leaving: HashMap<String, Instant>,
    watchers: HashMap<String, HashSet<u64>>,
}

impl State {
    fn send(&mut self, to: u64, v: &Value) {
        let text = v.to_string();
        let mut frame = vec![0x81];
        let n = text.len();
        if n < 126 {
            frame.push(n as u8);
        } else {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        frame.extend_from_slice(text.as_bytes());
        if let Some(w) = self.writers.get_mut(&to) {
            let _ = w.write_all(&frame);
        }
    }

    fn presence(&mut self, user: &str, ty: &str) {
        let ev = json!({"type": ty, "data": {"user_id": user,
            "status": if ty == "presence.online" { "online" } else { "offline" },
            "text": null, "last_seen": null}, "timestamp": 1});
        let to: Vec<u64> = self
            .watchers
            .get(user)
            .map(|w| w.iter().copied().collect())
            .unwrap_or_default();
        for w in to {
            self.send(w, &ev);
        }
    }

    fn typing_event(&mut self, from: u64, room: &str, ty: &str) {
        let user = self.user_of.get(&from).cloned().unwrap_or_default();
        let ev = json!({"type": ty, "room": room, "data": {"user_id": user, "room": room},
            "timestamp": 1});
        let to: Vec<u64> = self
            .rooms
            .get(room)
            .map(|m| m.iter().copied().filter(|c| *c != from).collect())
            .unwrap_or_default();
        for c in to {
            self.send(c, &ev);
        }
    }
}

/// Starts the server; returns its `ws://` URL. It runs until the test process exits.
pub fn start(typing_ttl: Duration, grace: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/ws", listener.local_addr().expect("addr"));
    let state = Arc::new(Mutex::new(State::default()));
    let st = Arc::clone(&state);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(10));
        let mut s = st.lock().expect("state");
        let due: Vec<String> = s
            .leaving
            .iter()
            .filter(|(_, t)| t.elapsed() >= grace)
            .map(|(u, _)| u.clone())
            .collect();
        for u in due {
            s.leaving.remove(&u);
            s.online.remove(&u);
            s.presence(&u, "presence.offline");
        }
    });
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let st = Arc::clone(&state);
            std::thread::spawn(move || serve(stream, &st, typing_ttl));
        }
    });
    url
}

fn serve(mut sock: TcpStream, state: &Mutex<State>, ttl: Duration) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    buf.drain(..head_end);
    let target = head.split(' ').nth(1).unwrap_or("/");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let param = |k: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let user = param("user_id");
    let _ = sock.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let id = {
        let mut s = state.lock().expect("state");
        s.next_id += 1;
        let id = s.next_id;
        s.writers
            .insert(id, sock.try_clone().expect("clone socket"));
        s.send(
            id,
            &json!({"type": "connected", "data": {"user_id": user}, "timestamp": 1}),
        );
        if let Some(u) = &user {
            s.user_of.insert(id, u.clone());
            let d = s.devices.entry(u.clone()).or_insert(0);
            *d += 1;
            if *d == 1 && s.leaving.remove(u).is_none() && s.online.insert(u.clone()) {
                s.presence(u, "presence.online");
            }
        }
        if let Some(room) = param("subscribe") {
            s.rooms.entry(room.clone()).or_default().insert(id);
            s.send(
                id,
                &json!({"type": "subscribed", "room": room, "data": {"room": room}}),
            );
        }
        id
    };
    'read: loop {
        // Masked client frames: FIN+op, MASK+len, [ext len], mask, payload.
        while buf.len() >= 2 {
            let op = buf[0] & 0x0f;
            let (len, hl) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 => break,
                n => (usize::from(n), 2),
            };
            if buf.len() < hl + 4 + len {
                break;
            }
            let mask = [buf[hl], buf[hl + 1], buf[hl + 2], buf[hl + 3]];
            let payload: Vec<u8> = buf[hl + 4..hl + 4 + len]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            buf.drain(..hl + 4 + len);
            if op == 0x8 {
                break 'read;
            }
            if op == 0x1 {
                command(state, id, &payload, ttl);
            }
        }
        match sock.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut s = state.lock().expect("state");
    s.writers.remove(&id);
    for m in s.rooms.values_mut() {
        m.remove(&id);
    }
    s.typing.retain(|(c, _), _| *c != id);
    if let Some(u) = s.user_of.remove(&id) {
        let d = s.devices.entry(u.clone()).or_insert(1);
        *d -= 1;
        if *d == 0 {
            s.leaving.insert(u, Instant::now());
        }
    }
}

fn command(state: &Mutex<State>, id: u64, payload: &[u8], ttl: Duration) {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let room = v["room"].as_str().unwrap_or("").to_string();
    let mut s = state.lock().expect("state");
    match v["type"].as_str() {
        Some("subscribe") => {
            s.rooms.entry(room.clone()).or_default().insert(id);
            s.send(
                id,
                &json!({"type": "subscribed", "room": room, "data": {"room": room}}),
            );
        }
        Some("typing.start") => {
            let fresh = s
                .typing
                .get(&(id, room.clone()))
                .is_none_or(|t| t.elapsed() >= ttl);
            s.typing.insert((id, room.clone()), Instant::now());
            if fresh {
                s.typing_event(id, &room, "typing.start");
            }
        }
        Some("typing.stop") => {
            if s.typing.remove(&(id, room.clone())).is_some() {
                s.typing_event(id, &room, "typing.stop");
            }
        }
        Some("presence.watch") => {
            for u in v["user_ids"].as_array().into_iter().flatten() {
                if let Some(u) = u.as_str() {
                    s.watchers.entry(u.to_string()).or_default().insert(id);
                }
            }
            s.send(
                id,
                &json!({"type": "presence.state", "data": {"users": []}}),
            );
        }
        _ => s.send(
            id,
            &json!({"type": "error", "error": "unknown message type"}),
        ),
    }
}
