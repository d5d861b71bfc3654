//! The presence endpoints, answered on the shard that holds the HTTP connection, from the
//! node's directory, without a round trip (as `presence.query` is):
//! - who is connected: `dir.users` (users with a device on the node, node-wide counts);
//! - what others see of them: the record each user's owner shard publishes in
//!   `dir.presence` (status, text, `last_seen`; none for the plain online state), read
//!   through the same [`view`] as the WebSocket, so both tell the same story: a user in the
//!   offline grace reads online with 0 devices, an invisible user reads offline.
//!
//! `GET /presence/online` lists users whose public view is not `offline` (invisible users
//! are never listed, not even to themselves), in user id order, after `after`. Cost: one pass
//! over the node's users and presence records keeping the `limit + 1` smallest ids (a
//! `BTreeSet`), O(n log limit), no allocation per user skipped; a listing, not a message
//! path. With more than one node (Redis) it lists this node's users only.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{json, PresenceOp, RestError};
use crate::directory::Directory;
use crate::http::Status;
use crate::shard::service::presence::state::view;

/// Answer a presence op for `me`. `allowed`: the users `me` may address (`address_policy:
/// claim`: the token's `allowed_users`, empty without a token); `None`: anyone (`any`).
pub fn answer(
    dir: &Directory,
    me: &str,
    op: &PresenceOp,
    allowed: Option<&[String]>,
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
        PresenceOp::Online { after, limit } => Ok(online(dir, after.as_deref(), *limit, allowed)),
    }
}

/// `{"users":[...],"next":"<last user id>"|null}`.
fn online(
    dir: &Directory,
    after: Option<&str>,
    limit: usize,
    allowed: Option<&[String]>,
) -> Vec<u8> {
    let mut best: BTreeSet<Arc<str>> = BTreeSet::new();
    let keep = limit.saturating_add(1);
    let mut consider = |name: &Arc<str>| {
        if after.is_some_and(|a| **name <= *a) {
            return;
        }
        if best.len() >= keep && best.last().is_some_and(|last| name >= last) {
            return;
        }
        let rec = dir.presence.get(name);
        if view(rec.as_deref(), dir.users.count(name), false).status == "offline" {
            return;
        }
        if best.insert(name.clone()) && best.len() > keep {
            best.pop_last();
        }
    };
    match allowed {
        Some(list) => {
            for u in list {
                consider(&Arc::from(u.as_str()));
            }
        }
        None => {
            dir.users.for_each_name(&mut consider);
            // Users in their offline grace have no device but still read online.
            dir.presence.for_each(|name, rec| {
                if rec.status.visible() {
                    consider(name);
                }
            });
        }
    }
    let more = best.len() > limit;
    let shown: Vec<Arc<str>> = best.into_iter().take(limit).collect();
    let next = if more { shown.last().cloned() } else { None };
    json::page(
        "users",
        &shown,
        |o| {
            o.opt_str("next", next.as_deref());
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
        serde_json::from_slice(&answer(d, me, &op, allowed).unwrap()).unwrap()
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
        let e = answer(&d, "alice", &user("carol"), Some(&allowed)).unwrap_err();
        assert_eq!((e.status, &*e.text), (Status::FORBIDDEN, "not allowed"));
    }
}
