//! The notification mapping: how a Kafka record becomes a user or room notification. Sans-IO:
//! it owns the `kafka_notifications` config value (parsed and checked here) and the pure
//! function from (topic, key, value) to a [`Mapped`] notification or the reason it is
//! [`Unmappable`]. It never touches a socket, a store or a consumer: the bridge's consumer
//! (`bridge::notify`) runs it per record and acts on the answer.
//!
//! ```yaml
//! kafka_notifications:
//!   - topic: jobs.posted          # an exact topic name ...
//!     user: /clientId             # the target user: a JSON pointer into the value, or `key`
//!     kind: job.posted            # default: the topic name
//!     data:                       # output name: JSON pointer (or a list of pointers, or "*")
//!       jobId: /jobId
//!       title: /title
//!   - pattern: "payments.*"       # ... or a glob (`*` any run, `?` one character)
//!     user: key
//!     data: "*"                   # the whole value (the default)
//!   - topic: courses.completed
//!     room: /courseRoom           # a room: every subscriber of it gets the notification
//! ```
//!
//! The first rule whose `topic` equals, or whose `pattern` matches, the record's topic maps it;
//! the consumer subscribes to every `topic` and to every `pattern` as a librdkafka regex
//! ([`Rule::subscription`]). A field named in `data` that the value lacks is left out; the
//! target must be there (a non-empty string, or a number, which is used as its decimal text).

use serde_norway::Value;
use sonic_rs::{JsonContainerTrait, JsonType, JsonValueTrait, Value as Json};

/// Most rules in `kafka_notifications` (each record walks them in order until one matches).
pub const NOTIFY_RULES_MAX: usize = 256;
/// Most fields (`data` entries) one rule copies into a notification.
pub const NOTIFY_FIELDS_MAX: usize = 64;
/// Largest record value mapped (parsed as JSON); a larger one is dead-lettered unparsed.
pub const NOTIFY_RECORD_BYTES_MAX: usize = 256 * 1024;
/// Largest `data` of one notification (its JSON text), as stored and sent to devices.
pub const NOTIFY_DATA_BYTES_MAX: usize = 64 * 1024;
/// Longest user id or room name a record may target.
pub const NOTIFY_TARGET_BYTES_MAX: usize = crate::limits::ID_BYTES_MAX;
/// Longest JSON pointer, output name or topic pattern in a rule.
pub const NOTIFY_NAME_BYTES_MAX: usize = 249;
/// Longest `kind` (the server API's bound: 1 to 64 of letters, digits and `. _ - :`).
pub const NOTIFY_KIND_BYTES_MAX: usize = 64;

/// Which topics a rule maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topics {
    /// Exactly this topic.
    Exact(String),
    /// Every topic this glob matches (`*` any run, `?` one character).
    Glob(String),
}

/// Who gets the notification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// Every device of one user (stored, so REST lists it and a redelivery is not shown twice).
    User,
    /// Every subscriber of one room (not stored).
    Room,
}

/// Where the target's id is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum From {
    /// The record's key, as UTF-8.
    Key,
    /// A JSON pointer (RFC 6901) into the record's value.
    Pointer(String),
}

/// What goes into the notification's `data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// The whole value (an object).
    All,
    /// These (output name, JSON pointer) pairs, in order.
    Fields(Vec<(String, String)>),
}

/// One mapping rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub topics: Topics,
    pub target: TargetKind,
    pub from: From,
    /// None: the record's topic.
    pub kind: Option<String>,
    pub data: Data,
}

impl Rule {
    pub fn matches(&self, topic: &str) -> bool {
        match &self.topics {
            Topics::Exact(t) => t == topic,
            Topics::Glob(g) => crate::auth::glob_match(g, topic),
        }
    }

    /// The name to subscribe to: the topic itself, or the glob as a librdkafka regex
    /// (`jobs.*` -> `^jobs\..*$`; a topic name has only `a-z A-Z 0-9 . _ -`, so `.` is the one
    /// character to escape).
    pub fn subscription(&self) -> String {
        match &self.topics {
            Topics::Exact(t) => t.clone(),
            Topics::Glob(g) => {
                let mut re = String::with_capacity(g.len() * 2 + 2);
                re.push('^');
                for c in g.chars() {
                    match c {
                        '*' => re.push_str(".*"),
                        '?' => re.push('.'),
                        '.' => re.push_str("\\."),
                        c => re.push(c),
                    }
                }
                re.push('$');
                re
            }
        }
    }
}

/// Whom a mapped record notifies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    User(String),
    Room(String),
}

/// A record mapped to a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub target: Target,
    pub kind: String,
    /// The notification's `data`: a JSON object's text, at most [`NOTIFY_DATA_BYTES_MAX`].
    pub data_json: String,
}

/// Why a record cannot be mapped: it goes to the dead-letter topic with [`Unmappable::reason`]
/// in a header (the producer of the record must fix it; the partition carries on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmappable {
    /// No rule matches the topic (a pattern subscription found a topic no rule maps).
    NoRule,
    /// The value is over [`NOTIFY_RECORD_BYTES_MAX`] bytes.
    TooBig(usize),
    /// The record has no value (a tombstone).
    NoValue,
    /// The value is not JSON (the parser's message).
    BadJson(String),
    /// The value is JSON but not an object.
    NotObject,
    /// The target is not in the record (the pointer, or `key`).
    NoTarget(String),
    /// The target is there but not a non-empty string or a number, or too long.
    BadTarget(String),
    /// The mapped `data` is over [`NOTIFY_DATA_BYTES_MAX`] bytes.
    DataTooBig(usize),
    /// The rule has no `kind` and the topic name, its default, is over
    /// [`NOTIFY_KIND_BYTES_MAX`] bytes.
    KindTooLong,
}

impl Unmappable {
    /// The text of the dead-letter record's `dlq-reason` header.
    pub fn reason(&self) -> String {
        match self {
            Unmappable::NoRule => "no mapping rule for this topic".into(),
            Unmappable::TooBig(n) => {
                format!("value of {n} bytes is over the {NOTIFY_RECORD_BYTES_MAX}-byte limit")
            }
            Unmappable::NoValue => "no value (tombstone)".into(),
            Unmappable::BadJson(e) => format!("value is not JSON: {e}"),
            Unmappable::NotObject => "value is not a JSON object".into(),
            Unmappable::NoTarget(at) => format!("no target: {at} is missing"),
            Unmappable::BadTarget(why) => format!("bad target: {why}"),
            Unmappable::DataTooBig(n) => {
                format!("data of {n} bytes is over the {NOTIFY_DATA_BYTES_MAX}-byte limit")
            }
            Unmappable::KindTooLong => format!(
                "the topic name, the default kind, is over {NOTIFY_KIND_BYTES_MAX} bytes: give the rule a kind"
            ),
        }
    }
}

/// The index of the first rule for `topic`.
pub fn rule_for(rules: &[Rule], topic: &str) -> Option<usize> {
    rules.iter().position(|r| r.matches(topic))
}

/// Map one record of `topic` with `rules` (the first matching rule).
pub fn map_record(
    rules: &[Rule],
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Mapped, Unmappable> {
    let rule = rule_for(rules, topic)
        .map(|i| &rules[i])
        .ok_or(Unmappable::NoRule)?;
    map_with(rule, topic, key, value)
}

/// Map one record with `rule`.
pub fn map_with(
    rule: &Rule,
    topic: &str,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> Result<Mapped, Unmappable> {
    if rule.kind.is_none() && topic.len() > NOTIFY_KIND_BYTES_MAX {
        return Err(Unmappable::KindTooLong);
    }
    let value = value.ok_or(Unmappable::NoValue)?;
    if value.len() > NOTIFY_RECORD_BYTES_MAX {
        return Err(Unmappable::TooBig(value.len()));
    }
    let v: Json = sonic_rs::from_slice(value).map_err(|e| Unmappable::BadJson(e.to_string()))?;
    if !v.is_object() {
        return Err(Unmappable::NotObject);
    }
    let id = match &rule.from {
        From::Key => {
            let k = key.ok_or_else(|| Unmappable::NoTarget("key".into()))?;
            std::str::from_utf8(k)
                .map_err(|_| Unmappable::BadTarget("the key is not UTF-8".into()))?
                .to_owned()
        }
        From::Pointer(p) => match pointer(&v, p) {
            None => return Err(Unmappable::NoTarget(p.clone())),
            Some(x) => match x.get_type() {
                JsonType::Null => return Err(Unmappable::NoTarget(p.clone())),
                JsonType::String => x.as_str().unwrap_or_default().to_owned(),
                JsonType::Number => sonic_rs::to_string(x).unwrap_or_default(),
                _ => {
                    return Err(Unmappable::BadTarget(format!(
                        "{p} is not a string or a number"
                    )))
                }
            },
        },
    };
    if id.is_empty() {
        return Err(Unmappable::BadTarget("empty".into()));
    }
    if id.len() > NOTIFY_TARGET_BYTES_MAX {
        return Err(Unmappable::BadTarget(format!(
            "{} bytes, over {NOTIFY_TARGET_BYTES_MAX}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(Unmappable::BadTarget("holds a control character".into()));
    }
    let data_json = match &rule.data {
        Data::All => sonic_rs::to_string(&v).map_err(|e| Unmappable::BadJson(e.to_string()))?,
        Data::Fields(fields) => {
            // Written in the configured order; a field the value lacks is left out.
            let mut out = Vec::with_capacity(256);
            out.push(b'{');
            for (name, p) in fields {
                if let Some(x) = pointer(&v, p) {
                    if out.len() > 1 {
                        out.push(b',');
                    }
                    crate::proto::json::write_str(&mut out, name);
                    out.push(b':');
                    sonic_rs::to_writer(&mut out, x)
                        .map_err(|e| Unmappable::BadJson(e.to_string()))?;
                }
            }
            out.push(b'}');
            String::from_utf8(out).map_err(|e| Unmappable::BadJson(e.to_string()))?
        }
    };
    if data_json.len() > NOTIFY_DATA_BYTES_MAX {
        return Err(Unmappable::DataTooBig(data_json.len()));
    }
    let target = match rule.target {
        TargetKind::User => Target::User(id),
        TargetKind::Room => Target::Room(id),
    };
    Ok(Mapped {
        target,
        kind: rule.kind.clone().unwrap_or_else(|| topic.to_owned()),
        data_json,
    })
}

/// The value `p` (an RFC 6901 JSON pointer, `/a/0/b`, `~1` for `/`, `~0` for `~`) points at.
pub fn pointer<'v>(v: &'v Json, p: &str) -> Option<&'v Json> {
    let mut at = v;
    for token in p.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        at = if at.is_object() {
            at.as_object()?.get(&token)?
        } else if at.is_array() {
            // RFC 6901: no leading zeros, no sign.
            if token.len() > 1 && token.starts_with('0') {
                return None;
            }
            let i: usize = token.parse().ok()?;
            at.as_array()?.get(i)?
        } else {
            return None;
        };
    }
    Some(at)
}

/// Whether `t` is a Kafka topic name (1 to 249 of `a-z A-Z 0-9 . _ -`).
pub fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A kind as the server API takes it: 1 to 64 of letters, digits and `. _ - :`.
fn is_kind(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= NOTIFY_KIND_BYTES_MAX
        && k.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'))
}

fn is_pointer(p: &str) -> bool {
    p.starts_with('/') && p.len() <= NOTIFY_NAME_BYTES_MAX
}

/// Parse the `kafka_notifications` value: a list of rule maps.
pub fn parse(v: &Value) -> Result<Vec<Rule>, String> {
    const EXPECTED: &str =
        "a list of maps with `topic` or `pattern`, `user` or `room`, and optional `kind` and `data`";
    let items = match v {
        Value::Sequence(items) => items,
        Value::Null => return Ok(Vec::new()),
        _ => return Err(EXPECTED.into()),
    };
    if items.len() > NOTIFY_RULES_MAX {
        return Err(format!(
            "at most {NOTIFY_RULES_MAX} rules, got {}",
            items.len()
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_rule(item).map_err(|e| format!("rule {i}: {e}")))
        .collect()
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        _ => None,
    }
}

fn parse_rule(item: &Value) -> Result<Rule, String> {
    let Value::Mapping(map) = item else {
        return Err("expected a map".into());
    };
    let mut topics = None;
    let mut target = None;
    let mut kind = None;
    let mut data = Data::All;
    for (k, val) in map {
        let Some(k) = text(k) else {
            return Err("keys must be strings".into());
        };
        match k {
            "topic" | "pattern" => {
                if topics.is_some() {
                    return Err("give one of `topic` and `pattern`".into());
                }
                let t = text(val).unwrap_or("");
                topics = Some(if k == "topic" {
                    if !is_topic_name(t) {
                        return Err(format!(
                            "topic {t:?} is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
                        ));
                    }
                    Topics::Exact(t.to_owned())
                } else {
                    let body: String = t.chars().filter(|c| !matches!(c, '*' | '?')).collect();
                    let ok = !t.is_empty()
                        && t.len() <= NOTIFY_NAME_BYTES_MAX
                        && (body.is_empty() || is_topic_name(&body));
                    if !ok {
                        return Err(format!(
                            "pattern {t:?} is not a glob of topic-name characters (a-z A-Z 0-9 . _ - with * and ?)"
                        ));
                    }
                    Topics::Glob(t.to_owned())
                });
            }
            "user" | "room" => {
                if target.is_some() {
                    return Err("give one of `user` and `room`".into());
                }
                let from = match text(val) {
                    Some("key") => From::Key,
                    Some(p) if is_pointer(p) => From::Pointer(p.to_owned()),
                    _ => {
                        return Err(format!(
                            "`{k}` must be `key` or a JSON pointer into the value (`/userId`)"
                        ))
                    }
                };
                let t = if k == "user" {
                    TargetKind::User
                } else {
                    TargetKind::Room
                };
                target = Some((t, from));
            }
            "kind" => match text(val) {
                Some(s) if is_kind(s) => kind = Some(s.to_owned()),
                _ => {
                    return Err(format!(
                        "`kind` must be 1 to {NOTIFY_KIND_BYTES_MAX} bytes of letters, digits and . _ - :"
                    ))
                }
            },
            "data" => data = parse_data(val)?,
            other => {
                return Err(format!(
                    "unknown key `{other}` (expected topic, pattern, user, room, kind, data)"
                ))
            }
        }
    }
    let topics = topics.ok_or("needs `topic` (a name) or `pattern` (a glob)")?;
    let (target, from) = target.ok_or("needs `user` or `room` (`key` or a JSON pointer)")?;
    Ok(Rule {
        topics,
        target,
        from,
        kind,
        data,
    })
}

fn parse_data(v: &Value) -> Result<Data, String> {
    const EXPECTED: &str =
        "`data` must be \"*\", a map of output name: JSON pointer, or a list of JSON pointers";
    let fields: Vec<(String, String)> = match v {
        Value::String(s) if s == "*" => return Ok(Data::All),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, p)| match (text(k), text(p)) {
                (Some(k), Some(p))
                    if !k.is_empty() && k.len() <= NOTIFY_NAME_BYTES_MAX && is_pointer(p) =>
                {
                    Ok((k.to_owned(), p.to_owned()))
                }
                _ => Err(EXPECTED.to_string()),
            })
            .collect::<Result<_, _>>()?,
        Value::Sequence(s) => s
            .iter()
            .map(|p| match text(p) {
                // The output name is the pointer's last token, unescaped (RFC 6901).
                Some(p) if is_pointer(p) && p.len() > 1 => {
                    let last = p.rsplit('/').next().unwrap_or(p);
                    Ok((last.replace("~1", "/").replace("~0", "~"), p.to_owned()))
                }
                _ => Err(EXPECTED.to_string()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(EXPECTED.into()),
    };
    if fields.len() > NOTIFY_FIELDS_MAX {
        return Err(format!(
            "`data` names {} fields, at most {NOTIFY_FIELDS_MAX}",
            fields.len()
        ));
    }
    for (i, (name, _)) in fields.iter().enumerate() {
        if fields[..i].iter().any(|(n, _)| n == name) {
            return Err(format!("`data` names the output field {name:?} twice"));
        }
    }
    Ok(Data::Fields(fields))
}

/// Every distinct name or regex the consumer subscribes to, for `rules`.
pub fn subscriptions(rules: &[Rule]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(rules.len());
    for r in rules {
        let s = r.subscription();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(yaml: &str) -> Vec<Rule> {
        parse(&serde_norway::from_str(yaml).unwrap()).unwrap()
    }

    fn err(yaml: &str) -> String {
        parse(&serde_norway::from_str(yaml).unwrap()).unwrap_err()
    }

    fn data(m: &Mapped) -> serde_json::Value {
        serde_json::from_str(&m.data_json).unwrap()
    }

    #[test]
    fn user_from_a_pointer_with_named_fields_and_a_kind() {
        let r = rules(
            "- topic: jobs.posted\n  user: /client/id\n  kind: job.posted\n  data:\n    jobId: /jobId\n    title: /title\n    missing: /nope\n",
        );
        let v = br#"{"jobId":"j1","title":"Fix","client":{"id":"u1"},"secret":1}"#;
        let m = map_record(&r, "jobs.posted", None, Some(v)).unwrap();
        assert_eq!(m.target, Target::User("u1".into()));
        assert_eq!(m.kind, "job.posted");
        assert_eq!(data(&m), json!({"jobId":"j1","title":"Fix"}));
    }

    #[test]
    fn user_from_the_key_the_whole_value_and_the_topic_as_kind() {
        let r = rules("- pattern: \"payments.*\"\n  user: key\n");
        let v = br#"{"amount":5}"#;
        let m = map_record(&r, "payments.received", Some(b"u7"), Some(v)).unwrap();
        assert_eq!(m.target, Target::User("u7".into()));
        assert_eq!(m.kind, "payments.received");
        assert_eq!(data(&m), json!({"amount":5}));
        assert_eq!(
            map_record(&r, "payments.received", None, Some(v)),
            Err(Unmappable::NoTarget("key".into()))
        );
        assert_eq!(
            map_record(&r, "jobs.posted", Some(b"u7"), Some(v)),
            Err(Unmappable::NoRule)
        );
    }

    #[test]
    fn room_targets_numbers_and_a_list_of_pointers() {
        let r =
            rules("- topic: courses.completed\n  room: /courseId\n  data: [/user/name, /a~1b]\n");
        let v = br#"{"courseId":42,"user":{"name":"Ann"},"a/b":true}"#;
        let m = map_record(&r, "courses.completed", None, Some(v)).unwrap();
        assert_eq!(m.target, Target::Room("42".into()));
        assert_eq!(data(&m), json!({"name":"Ann","a/b":true}));
    }

    #[test]
    fn first_matching_rule_wins() {
        let r = rules(
            "- topic: jobs.deleted\n  user: key\n  kind: gone\n- pattern: jobs.*\n  user: key\n",
        );
        let v = Some(&b"{}"[..]);
        assert_eq!(
            map_record(&r, "jobs.deleted", Some(b"u"), v).unwrap().kind,
            "gone"
        );
        assert_eq!(
            map_record(&r, "jobs.updated", Some(b"u"), v).unwrap().kind,
            "jobs.updated"
        );
        assert_eq!(subscriptions(&r), vec!["jobs.deleted", "^jobs\\..*$"]);
    }

    #[test]
    fn unmappable_records_say_why() {
        let r = rules("- topic: t\n  user: /userId\n");
        let m = |v: &[u8]| map_record(&r, "t", None, Some(v)).unwrap_err();
        assert!(matches!(m(b"{nope"), Unmappable::BadJson(_)));
        assert_eq!(m(b"[1]"), Unmappable::NotObject);
        assert_eq!(m(b"{}"), Unmappable::NoTarget("/userId".into()));
        assert_eq!(
            m(br#"{"userId":null}"#),
            Unmappable::NoTarget("/userId".into())
        );
        assert!(matches!(m(br#"{"userId":""}"#), Unmappable::BadTarget(_)));
        assert!(matches!(
            m(br#"{"userId":{"a":1}}"#),
            Unmappable::BadTarget(_)
        ));
        assert!(matches!(
            m(br#"{"userId":"a\nb"}"#),
            Unmappable::BadTarget(_)
        ));
        let long = format!(
            r#"{{"userId":"{}"}}"#,
            "x".repeat(NOTIFY_TARGET_BYTES_MAX + 1)
        );
        assert!(matches!(m(long.as_bytes()), Unmappable::BadTarget(_)));
        let big = vec![b' '; NOTIFY_RECORD_BYTES_MAX + 1];
        assert_eq!(m(&big), Unmappable::TooBig(NOTIFY_RECORD_BYTES_MAX + 1));
        assert_eq!(map_record(&r, "t", None, None), Err(Unmappable::NoValue));
        let data = format!(
            r#"{{"userId":"u","x":"{}"}}"#,
            "y".repeat(NOTIFY_DATA_BYTES_MAX)
        );
        assert!(matches!(m(data.as_bytes()), Unmappable::DataTooBig(_)));
        assert_eq!(
            Unmappable::NoTarget("/userId".into()).reason(),
            "no target: /userId is missing"
        );
        let k = map_record(
            &rules("- topic: t\n  user: key\n"),
            "t",
            Some(&[0xff]),
            Some(b"{}"),
        );
        assert!(matches!(k, Err(Unmappable::BadTarget(_))));
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_index() {
        assert!(err("- user: key\n").contains("rule 0: needs `topic`"));
        assert!(err("- topic: t\n").contains("needs `user` or `room`"));
        assert!(err("- topic: t\n  user: key\n  room: key\n").contains("one of `user`"));
        assert!(err("- topic: t\n  pattern: t*\n  user: key\n").contains("one of `topic`"));
        assert!(err("- topic: a b\n  user: key\n").contains("not a Kafka topic name"));
        assert!(err("- pattern: \"a(b)*\"\n  user: key\n").contains("not a glob"));
        assert!(err("- topic: t\n  user: userId\n").contains("JSON pointer"));
        assert!(err("- topic: t\n  user: key\n  data: [x]\n").contains("`data` must be"));
        assert!(err("- topic: t\n  user: key\n  data: {a: /x, b: y}\n").contains("`data` must be"));
        assert!(err("- topic: t\n  user: key\n  data: [/a/x, /b/x]\n").contains("twice"));
        assert!(err("- topic: t\n  user: key\n  colour: red\n").contains("unknown key `colour`"));
        assert!(err("- topic: t\n  user: key\n  kind: a b\n").contains("`kind` must be"));
        let long = "t".repeat(NOTIFY_KIND_BYTES_MAX + 1);
        let r = rules("- pattern: \"t*\"\n  user: key\n");
        let got = map_record(&r, &long, Some(b"u"), Some(b"{}"));
        assert_eq!(got, Err(Unmappable::KindTooLong));
        assert!(err("topic: t\n").contains("a list of maps"));
        let many: String = (0..=NOTIFY_RULES_MAX)
            .map(|i| format!("- topic: t{i}\n  user: key\n"))
            .collect();
        assert!(err(&many).contains("at most"));
        let fields: String = (0..=NOTIFY_FIELDS_MAX)
            .map(|i| format!("    f{i}: /f{i}\n"))
            .collect();
        assert!(err(&format!("- topic: t\n  user: key\n  data:\n{fields}")).contains("at most"));
        assert_eq!(parse(&Value::Null).unwrap(), Vec::new());
    }

    #[test]
    fn the_example_mapping_in_docs_parses_and_maps_its_topics() {
        let text = include_str!("../docs/examples/notifications.yaml");
        let doc: Value = serde_norway::from_str(text).unwrap();
        let r = parse(&doc["kafka_notifications"]).unwrap();
        let topics = [
            "jobs.posted",
            "jobs.updated",
            "jobs.deleted",
            "payments.received",
            "payments.disputed",
            "proposals.submitted",
            "contracts.signed",
            "courses.completed",
            "certificates.issued",
            "users.joined",
        ];
        for t in topics {
            assert!(rule_for(&r, t).is_some(), "{t} has no rule");
        }
        let m = map_record(
            &r,
            "payments.received",
            Some(b"pay-1"),
            Some(br#"{"paymentId":"p1","userId":"u1","amount":12.5,"currency":"USD","contractId":"c1"}"#),
        )
        .unwrap();
        assert_eq!(m.target, Target::User("u1".into()));
        // And the whole file is a valid config file as it stands.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/examples/notifications.yaml"
        );
        let args = vec!["--config".to_string(), path.to_string()];
        let cfg = crate::config::Config::load(&args, &|_| None).expect("the example loads");
        assert_eq!(cfg.kafka_notifications, r);
        assert_eq!(cfg.kafka_group_id, "messaging-service");
    }
}
