//! The rooms module guide's JavaScript client (`seeds/001`, copied unchanged into
//! `tests/node/rooms_client.js`) runs under Node against `/ws`: connected, subscribe, publish,
//! the room message, unsubscribe, and the two refusals, each frame checked exactly. Node comes
//! from the README test command (`tests/run-all.sh` installs `nodejs` and, where Node has no
//! WebSocket of its own, the `ws` package); a machine without it fails here saying so.

mod common;

use std::process::Command;

use common::{assert_timestamp, assert_uuid, TestServer};
use serde_json::{json, Value};

/// `node` and the arguments that give it a WebSocket: Node 22+ has one, Node 20/21 behind
/// `--experimental-websocket`, older ones need the `ws` package on NODE_PATH.
fn node() -> (String, Vec<String>) {
    let node = std::env::var("SWITCHBOARD_NODE").unwrap_or_else(|_| "node".into());
    let version = Command::new(&node)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "cannot run {node:?} ({e}): install Node.js (`apt-get install nodejs`), or run the \
             README test command (tests/run-all.sh), which installs it"
        )
        });
    let v = String::from_utf8_lossy(&version.stdout);
    let major: u32 = v
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `node --version` output: {v:?}"));
    let mut args = Vec::new();
    if (20..22).contains(&major) {
        args.push("--experimental-websocket".to_owned());
    }
    (node, args)
}

#[test]
fn the_guides_javascript_client_runs_unchanged() {
    let server = TestServer::start(&[]);
    let (node, mut args) = node();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/rooms_client.js");
    args.push(script.to_owned());
    args.push(format!("ws://127.0.0.1:{}/ws", server.port));
    let out = Command::new(&node).args(&args).output().expect("run node");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node exited with {}: {stderr}\n(on Node < 20 the `ws` package must be on NODE_PATH: \
         tests/run-all.sh installs it)",
        out.status
    );
    let frames: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(frames.len(), 6, "{frames:#?}\nstderr: {stderr}");
    for f in &frames {
        assert_timestamp(f);
    }
    let connected = &frames[0];
    assert_uuid(&connected["data"]["client_id"]);
    let client_id = connected["data"]["client_id"].clone();
    assert_eq!(
        *connected,
        json!({"type": "connected",
               "data": {"client_id": client_id, "user_id": null,
                        "message": "Connected to WebSocket server"},
               "timestamp": connected["timestamp"]})
    );
    assert_eq!(
        frames[1],
        json!({"type": "subscribed", "room": "notifications",
               "data": {"room": "notifications", "client_count": 1},
               "timestamp": frames[1]["timestamp"]})
    );
    assert_eq!(
        frames[2],
        json!({"type": "message", "room": "notifications", "data": {"message": "Hello!"},
               "client_id": client_id, "timestamp": frames[2]["timestamp"]})
    );
    assert_eq!(
        frames[3],
        json!({"type": "unsubscribed", "room": "notifications",
               "data": {"room": "notifications"}, "timestamp": frames[3]["timestamp"]})
    );
    assert_eq!(
        frames[4],
        json!({"type": "error", "error": "not allowed", "timestamp": frames[4]["timestamp"]})
    );
    assert_eq!(
        frames[5],
        json!({"type": "error", "error": "not subscribed to this room",
               "timestamp": frames[5]["timestamp"]})
    );
}
