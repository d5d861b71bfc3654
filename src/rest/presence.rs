//! The presence endpoints, answered on the shard that holds the HTTP connection, from the
//! node's directory, without a round trip (as `presence.query` is):
//! - who is connected: `dir.users` (users with a device on the node, node-wide counts);
//! - what others see of them: the record each user's owner shard publishes in
//!   `dir.presence` (status, text, `last_seen`; none for the plain online state), read
//!   through the same [`view`] as the WebSocket, so both tell the same story: a user in the
//!   offline grace reads online with 0 devices, an invisible user reads offline.
//!
//! `GET /presence/online` lists users whose public view is not `offline` (invisible users
//! are never listed, not even to themselves), in user id order, after `after`. The list of
//! names comes from a per-shard [`Snapshot`] of the node's online users, rebuilt when older
//! than [`REST_ONLINE_SNAPSHOT_MS`] (one pass over the node's users and presence records and
//! a sort: 10-15 ms at 100,000 online users, 0.7-1.3 ms at 10,000, release build on this
//! shared 2-core VM; a first version that scanned the directory for every page took 6.4 ms a
//! page at 100,000); a page is then a binary search plus
//! `limit` fresh views. The snapshot holds every user with a device (and every record that
//! reads online): who others see online is decided per page, so a user who went invisible
//! or offline since the build is skipped at once, and `next` is given only when a visible
//! user follows. With more than one node (Redis) it
//! lists this node's users only.

use std::sync::Arc;

use super::{json, PresenceOp, RestError};
use crate::directory::Directory;
use crate::http::Status;
use crate::limits::REST_ONLINE_SNAPSHOT_MS;
use crate::shard::service::presence::state::view;

/// Bytes of a name compared inline while sorting a [`Snapshot`].
const SORT_PREFIX_BYTES: usize = 16;

/// One shard's sorted list of the node's online users (see the module doc).
#[derive(Debug, Default)]
pub struct Snapshot {
    built_ms: Option<u64>,
    names: Vec<Arc<str>>,
}

impl Snapshot {
    /// The list as of at most [`REST_ONLINE_SNAPSHOT_MS`] before `now_ms`.
    fn current(&mut self, dir: &Directory, now_ms: u64) -> &[Arc<str>] {
        let fresh = self
            .built_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < REST_ONLINE_SNAPSHOT_MS);
        if !fresh {
            // Every user with a device, and every record that reads online (users in their
            // offline grace have no device): who of them others see online is decided per
            // page, from fresh views, so the build does no lookup per user.
            // Sorted on an inline prefix first: most comparisons then touch no name's heap
            // memory (half the time of sorting the `Arc<str>`s alone, measured).
            let mut keyed: Vec<([u8; SORT_PREFIX_BYTES], Arc<str>)> =
                Vec::with_capacity(self.names.len() + 64);
            let mut add = |name: &Arc<str>| {
                let mut key = [0u8; SORT_PREFIX_BYTES];
                let n = name.len().min(SORT_PREFIX_BYTES);
                key[..n].copy_from_slice(&name.as_bytes()[..n]);
                keyed.push((key, name.clone()));
            };
            dir.users.for_each_name(&mut add);
            dir.presence.for_each(|name, rec| {
                if rec.status.visible() {
                    add(name);
                }
            });
            // (prefix zero-padded, name) orders as the names do: a prefix difference is the
            // names' first difference (or the shorter name ending), a tie defers to the names.
            keyed.sort_unstable();
            self.names.clear();
            self.names.extend(keyed.into_iter().map(|(_, name)| name));
            self.names.dedup();
            if self.names.capacity() > 2 * self.names.len().max(64) {
                self.names.shrink_to_fit();
            }
            self.built_ms = Some(now_ms);
        }
        &self.names
    }
}

/// Whether others see `name` online now.
fn visible(dir: &Directory, name: &str) -> bool {
    let rec = dir.presence.get(name);
    view(rec.as_deref(), dir.users.count(name), false).status != "offline"
}

/// Answer a presence op for `me` at `now_ms`. `allowed`: the users `me` may address
/// (`address_policy: claim`: the token's `allowed_users`, empty without a token); `None`:
/// anyone (`any`). `snapshot`: this shard's (used by the online list under `any`).
pub fn answer(
    dir: &Directory,
    me: &str,
    op: &PresenceOp,
    allowed: Option<&[String]>,
    snapshot: &mut Snapshot,
    now_ms: u64,
) -> Result<Vec<u8>, RestError> {
    match op {
        PresenceOp::User { user } => {
            if let Some(list) = allowed {
                if **user != *me && !list.iter().any(|u| **u == **user) {
                    return Err(RestError::new(Status::FORBIDDEN, "not allowed"));
                }
            }
            let rec = dir.presence.get(user);
            let v = view(rec.as_deref(), dir.users.count(user), **user == *me);
            Ok(json::body(|o| json::presence(o, user, &v)))
        }
        PresenceOp::Online { after, limit } => Ok(match allowed {
            Some(list) => {
                // Bounded by the token's size: no snapshot needed.
                let mut names: Vec<Arc<str>> = list.iter().map(|u| Arc::from(u.as_str())).collect();
                names.sort_unstable();
                names.dedup();
                online(dir, &names, after.as_deref(), *limit)
            }
            None => online(dir, snapshot.current(dir, now_ms), after.as_deref(), *limit),
        }),
    }
}

/// `{"users":[...],"next":"<last user id>"|null}` from the sorted `names`.
fn online(dir: &Directory, names: &[Arc<str>], after: Option<&str>, limit: usize) -> Vec<u8> {
    let start = after.map_or(0, |a| names.partition_point(|n| **n <= *a));
    let mut shown: Vec<&Arc<str>> = Vec::with_capacity(limit.min(names.len()));
    let mut rest = names[start..].iter();
    for name in rest.by_ref() {
        if visible(dir, name) {
            shown.push(name);
            if shown.len() == limit {
                break;
            }
        }
    }
    // `next` only when someone visible follows: no empty last page.
    let more = shown.len() == limit && rest.any(|n| visible(dir, n));
    let next = if more {
        shown.last().map(|n| &***n)
    } else {
        None
    };
    json::page(
        "users",
        &shown,
        |o| {
            o.opt_str("next", next);
        },
        |o, name| {
            let rec = dir.presence.get(name);
            let v = view(rec.as_deref(), dir.users.count(name), false);
            json::presence(o, name, &v);
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::service::presence::{Record, Status as P};
    use serde_json::{json, Value};

    fn dir() -> Directory {
        let d = Directory::new();
        for (u, devices) in [
            ("carol", 1),
            ("alice", 2),
            ("bob", 1),
            ("ivy", 1),
            ("zed", 0),
        ] {
            let name: Arc<str> = Arc::from(u);
            for _ in 0..devices {
                d.users.count_up(&name, 0);
            }
            if devices > 0 {
                d.users.arrive(&name, 0);
            }
        }
        let rec = |status, text: Option<&str>, last_seen_ms| {
            Arc::new(Record {
                status,
                text: text.map(Box::from),
                last_seen_ms,
            })
        };
        d.presence
            .set(Arc::from("bob"), rec(P::Away, Some("lunch"), 0));
        d.presence
            .set(Arc::from("ivy"), rec(P::Invisible, None, 1_000));
        // dan: in the offline grace (no device, a visible record).
        d.presence
            .set(Arc::from("dan"), rec(P::Online, None, 2_000));
        // olga: offline.
        d.presence
            .set(Arc::from("olga"), rec(P::Offline, None, 3_000));
        d
    }

    fn get(d: &Directory, me: &str, op: PresenceOp, allowed: Option<&[String]>) -> Value {
        // A fresh snapshot each time: these tests change the directory between calls.
        let mut snap = Snapshot::default();
        serde_json::from_slice(&answer(d, me, &op, allowed, &mut snap, 0).unwrap()).unwrap()
    }

    fn ids(v: &Value) -> Vec<&str> {
        v["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["userId"].as_str().unwrap())
            .collect()
    }

    fn online(after: Option<&str>, limit: usize) -> PresenceOp {
        PresenceOp::Online {
            after: after.map(Arc::from),
            limit,
        }
    }

    #[test]
    fn online_lists_visible_users_in_id_order_and_pages() {
        let d = dir();
        let v = get(&d, "alice", online(None, 10), None);
        assert_eq!(
            ids(&v),
            ["alice", "bob", "carol", "dan"],
            "no ivy (invisible), zed, olga"
        );
        assert!(v["next"].is_null());
        assert_eq!(
            v["users"][1],
            json!({"userId": "bob", "status": "away", "isOnline": true, "text": "lunch",
                "devices": 1, "lastSeen": null})
        );
        assert_eq!(v["users"][3]["devices"], 0, "dan is in the grace");
        // Pages of 2.
        let p1 = get(&d, "alice", online(None, 2), None);
        assert_eq!(
            (ids(&p1), p1["next"].as_str()),
            (vec!["alice", "bob"], Some("bob"))
        );
        let p2 = get(&d, "alice", online(Some("bob"), 2), None);
        assert_eq!(
            (ids(&p2), p2["next"].as_str()),
            (vec!["carol", "dan"], None)
        );
        let p3 = get(&d, "alice", online(Some("dan"), 2), None);
        assert_eq!(ids(&p3), Vec::<&str>::new());
        // Exactly a page: no next.
        let p = get(&d, "alice", online(None, 4), None);
        assert!(p["next"].is_null());
        // Invisible users are not listed to themselves either.
        assert!(!ids(&get(&d, "ivy", online(None, 10), None)).contains(&"ivy"));
    }

    #[test]
    fn online_under_claim_lists_only_allowed_users() {
        let d = dir();
        let allowed = vec![
            "carol".to_string(),
            "ivy".into(),
            "olga".into(),
            "carol".into(),
        ];
        let v = get(&d, "alice", online(None, 10), Some(&allowed));
        assert_eq!(ids(&v), ["carol"]);
        let v = get(&d, "alice", online(None, 10), Some(&[]));
        assert_eq!(ids(&v), Vec::<&str>::new());
    }

    #[test]
    fn one_user_reads_as_presence_query_does() {
        let d = dir();
        let user = |u: &str| PresenceOp::User { user: Arc::from(u) };
        let v = get(&d, "alice", user("ivy"), None);
        assert_eq!(
            v,
            json!({"userId": "ivy", "status": "offline", "isOnline": false, "text": null,
                "devices": 0, "lastSeen": "1970-01-01T00:00:01.000Z"})
        );
        let v = get(&d, "ivy", user("ivy"), None);
        assert_eq!(
            (v["status"].as_str(), v["devices"].as_u64()),
            (Some("invisible"), Some(1))
        );
        let v = get(&d, "alice", user("nobody"), None);
        assert_eq!(
            (v["status"].as_str(), &v["lastSeen"]),
            (Some("offline"), &Value::Null)
        );
        let v = get(&d, "alice", user("carol"), None);
        assert_eq!(
            (v["status"].as_str(), v["isOnline"].as_bool()),
            (Some("online"), Some(true))
        );
        // claim: only allowed users and yourself.
        let allowed = vec!["bob".to_string()];
        assert_eq!(
            get(&d, "alice", user("bob"), Some(&allowed))["status"],
            "away"
        );
        assert_eq!(
            get(&d, "alice", user("alice"), Some(&allowed))["devices"],
            2
        );
        let e = answer(
            &d,
            "alice",
            &user("carol"),
            Some(&allowed),
            &mut Snapshot::default(),
            0,
        )
        .unwrap_err();
        assert_eq!((e.status, &*e.text), (Status::FORBIDDEN, "not allowed"));
    }

    #[test]
    fn the_snapshot_is_reused_for_a_second_and_statuses_stay_fresh() {
        let d = dir();
        let mut snap = Snapshot::default();
        let mut page = |now_ms: u64, limit: usize| -> Value {
            let op = online(None, limit);
            serde_json::from_slice(&answer(&d, "x", &op, None, &mut snap, now_ms).unwrap()).unwrap()
        };
        assert_eq!(ids(&page(1_000, 10)), ["alice", "bob", "carol", "dan"]);
        // carol goes invisible, eve connects: within the second, carol is skipped at once
        // (fresh status) and eve is not listed yet; a page is short rather than wrong.
        d.presence.set(
            Arc::from("carol"),
            Arc::new(Record {
                status: P::Invisible,
                text: None,
                last_seen_ms: 5,
            }),
        );
        let eve: Arc<str> = Arc::from("eve");
        d.users.count_up(&eve, 0);
        d.users.arrive(&eve, 1);
        let p = page(1_999, 3);
        assert_eq!(
            (ids(&p), &p["next"]),
            (vec!["alice", "bob", "dan"], &Value::Null)
        );
        let p = page(1_999, 2);
        assert_eq!((ids(&p), &p["next"]), (vec!["alice", "bob"], &json!("bob")));
        // A second later the list is rebuilt.
        assert_eq!(ids(&page(2_000, 10)), ["alice", "bob", "dan", "eve"]);
    }

    #[test]
    fn the_snapshot_sorts_as_the_names_do() {
        let d = Directory::new();
        let names = [
            "b",
            "a",
            "ab",
            "ab\u{0}",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
            "abcdefghijklmnopA",
            "abcdefghijklmno",
            "é",
            "z",
            "A",
            "",
        ];
        for n in names {
            let name: Arc<str> = Arc::from(n);
            d.users.count_up(&name, 0);
            d.users.arrive(&name, 0);
        }
        let mut snap = Snapshot::default();
        let got: Vec<&str> = snap.current(&d, 0).iter().map(|n| &**n).collect();
        let mut want = names.to_vec();
        want.sort_unstable();
        assert_eq!(got, want);
    }
}
