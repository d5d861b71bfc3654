//! The PostgreSQL store against a real server (a throwaway cluster from `common::pg`): the
//! shared conformance body, then what only a real database shows: migrations at start, two
//! stores (two nodes) writing the same threads at once, and the server stopped and restarted
//! under a stream of appends. `bench_append_vs_bare_insert` (ignored) measures append against
//! bare batched INSERTs of the same rows.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pg::{self, ClusterOptions, PgCluster};
use switchboard::store::conformance::{self, dm};
use switchboard::store::pg::SCHEMA_VERSION;
use switchboard::store::pg::{PgConfig, PgStore};
use switchboard::store::{
    Appended, Lookup, Message, NewMessage, Refusal, Store, StoreError, ThreadRef,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The test stores' settings: the defaults, with a small pool (tests run in parallel against
/// one server).
fn config(url: &str) -> PgConfig {
    let mut c = PgConfig::new(url);
    c.pool_size = 4;
    c
}

async fn connect(cfg: PgConfig) -> PgStore {
    match PgStore::connect(cfg).await {
        Ok(s) => s,
        Err(e) => panic!("PgStore::connect: {e}"),
    }
}

/// A plain client for looking at the database behind the store's back.
async fn inspect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect for inspection");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

fn new_of(o: &Appended) -> &Message {
    match o {
        Appended::New { message, .. } => message,
        other => panic!("expected New, got {other:?}"),
    }
}

#[test]
fn conformance_against_postgres() {
    let url = pg::database("conformance");
    rt().block_on(async {
        let store = connect(config(&url)).await;
        assert_eq!(store.kind(), "postgres");
        conformance::run_all(&store, "one-").await;
        // Again on the same database: the checks compare ids relative to each other only.
        conformance::run_all(&store, "two-").await;
    });
}

#[test]
fn migrations_apply_once_even_when_nodes_start_together() {
    let url = pg::database("migrations");
    rt().block_on(async {
        // Two nodes starting at the same moment on an empty database.
        let (a, b) = tokio::join!(
            PgStore::connect(config(&url)),
            PgStore::connect(config(&url))
        );
        let (a, b) = (a.expect("first node"), b.expect("second node"));
        let db = inspect(&url).await;
        let rows = async |db: &tokio_postgres::Client| {
            db.query(
                "SELECT version, name, applied_at::text FROM switchboard_schema_migrations \
                 ORDER BY version",
                &[],
            )
            .await
            .expect("read migrations")
            .iter()
            .map(|r| {
                (
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                )
            })
            .collect::<Vec<_>>()
        };
        let first = rows(&db).await;
        assert_eq!(
            first.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=SCHEMA_VERSION).collect::<Vec<_>>()
        );
        // Connecting again applies nothing.
        let c = connect(config(&url)).await;
        assert_eq!(rows(&db).await, first);
        let counter: i64 = db
            .query_one("SELECT count(*) FROM switchboard_counters", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(counter, 1, "one counter row");
        for s in [&a, &b, &c] {
            s.ping().await.expect("ping");
        }
    });
}

/// A batch the server refuses for one entry's data (SQLSTATE class 22, which the store's own
/// checks did not foresee: here a trigger raises it for one content) is not lost as a whole:
/// the store runs it again entry by entry, refuses that entry alone, and commits the rest with
/// gapless seqs; a first DM of a thread that was refused leaves no thread behind.
#[test]
fn a_data_exception_refuses_its_entry_alone() {
    let url = pg::database("data_exception");
    rt().block_on(async {
        let store = connect(config(&url)).await;
        let db = inspect(&url).await;
        // An existing thread, so the cache knows it.
        store
            .append(&[dm("de-t", "de-al", "de-bo", "0", "m0")])
            .await
            .unwrap();
        db.batch_execute(
            "CREATE FUNCTION de_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.content = 'poison' THEN \
               RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'; \
             END IF; RETURN NEW; END $$; \
             CREATE TRIGGER de_refuse BEFORE INSERT ON switchboard_messages \
               FOR EACH ROW EXECUTE FUNCTION de_refuse();",
        )
        .await
        .unwrap();
        let batch = vec![
            dm("de-t", "de-al", "de-bo", "1", "m1"),
            dm("de-t", "de-bo", "de-al", "2", "poison"),
            // A first DM of a new thread, refused: the thread must not stay.
            dm("de-new", "de-cy", "de-al", "3", "poison"),
            // The refused entry's key, again: stored now.
            dm("de-t", "de-bo", "de-al", "2", "m2"),
            dm("de-new", "de-al", "de-cy", "4", "m3"),
            dm("de-t", "de-al", "de-bo", "1", "m1 (a retry)"),
        ];
        let out = store.append(&batch).await.expect("the batch commits");
        assert_eq!(new_of(&out[0]).seq, 2);
        assert_eq!(out[1], Appended::Refused(Refusal::InvalidText));
        assert_eq!(out[2], Appended::Refused(Refusal::InvalidText));
        assert_eq!(new_of(&out[3]).seq, 3, "no gap for the refused one");
        let first_of_new = new_of(&out[4]);
        assert_eq!(first_of_new.seq, 1);
        assert!(matches!(&out[5], Appended::Duplicate(m) if m.id == new_of(&out[0]).id));
        let ids: Vec<u64> = [0, 3, 4].iter().map(|&i| new_of(&out[i]).id).collect();
        assert!(ids.windows(2).all(|w| w[1] > w[0]), "ids in batch order");
        // The new thread was made by its first stored DM (al's), with al and cy.
        let view = match store
            .thread("de-cy", &ThreadRef::Id("de-new".into()))
            .await
            .unwrap()
        {
            Lookup::Found(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(view.numeric_id, first_of_new.thread_numeric_id);
        assert_eq!(view.last_seq, 1);
        // Exactly what the outcomes say is stored.
        let stored: i64 = db
            .query_one("SELECT count(*) FROM switchboard_messages", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, 4);
        // A single refused entry, and the next batches, go as usual.
        let out = store
            .append(&[dm("de-t", "de-al", "de-bo", "5", "poison")])
            .await
            .unwrap();
        assert_eq!(out[0], Appended::Refused(Refusal::InvalidText));
        let out = store
            .append(&[dm("de-t", "de-al", "de-bo", "6", "m4")])
            .await
            .unwrap();
        assert_eq!(new_of(&out[0]).seq, 4);
    });
}

/// A thread list and `sync` consider only the user's newest `threads_per_read_max` threads
/// (by numeric id): set to 3 here, a user in 5 threads sees the 3 newest, even when an older
/// one has the latest message.
#[test]
fn reads_consider_a_bounded_number_of_threads() {
    let url = pg::database("threads_per_read");
    rt().block_on(async {
        let mut cfg = config(&url);
        cfg.threads_per_read_max = 3;
        let store = connect(cfg).await;
        let mut threads = Vec::new();
        for i in 0..5 {
            let t = format!("tp-t{i}");
            store
                .append(&[dm(
                    &t,
                    "tp-me",
                    &format!("tp-peer{i}"),
                    &format!("c{i}"),
                    "m",
                )])
                .await
                .unwrap();
            threads.push(t);
        }
        // The oldest thread gets the newest message.
        store
            .append(&[dm(&threads[0], "tp-peer0", "tp-me", "late", "late")])
            .await
            .unwrap();
        let page = store.threads("tp-me", None, 10).await.unwrap();
        let got: Vec<&str> = page.items.iter().map(|t| &*t.id).collect();
        assert_eq!(got, ["tp-t4", "tp-t3", "tp-t2"]);
        assert_eq!(page.next, None);
        let synced = store.sync("tp-me", Some(0), 10).await.unwrap();
        let got: Vec<&str> = synced.messages.iter().map(|m| &*m.thread).collect();
        assert_eq!(got, ["tp-t2", "tp-t3", "tp-t4"]);
        let latest = store.sync("tp-me", None, 10).await.unwrap();
        assert_eq!(latest.messages.len(), 3);
        // The others still answer by id.
        assert!(matches!(
            store.thread("tp-me", &ThreadRef::Id("tp-t0".into())).await.unwrap(),
            Lookup::Found(v) if v.last_seq == 2
        ));
    });
}

/// Two stores on one database (two nodes) append interleaved batches into the same threads
/// while a reader follows a user's `sync` cursor: the reader must see every message exactly once
/// (a message committed with an id below a cursor already returned would be missed), seqs must
/// be gapless per thread and ordered like the ids.
#[test]
fn two_nodes_keep_ids_in_commit_order() {
    const BATCHES: usize = 40;
    const BATCH: usize = 12;
    const PEERS: usize = 6;
    let url = pg::database("two_nodes");
    rt().block_on(async {
        let (a, b) = tokio::join!(
            PgStore::connect(config(&url)),
            PgStore::connect(config(&url))
        );
        let (a, b) = (a.expect("node a"), b.expect("node b"));
        let hub = "hub";
        let thread = |i: usize| format!("two-t{}", i % PEERS);
        let peer = |i: usize| format!("two-p{}", i % PEERS);
        let done = AtomicBool::new(false);
        let writer = async |store: &PgStore, node: &'static str| {
            let mut acked = Vec::new();
            for n in 0..BATCHES {
                let batch: Vec<NewMessage> = (0..BATCH)
                    .map(|i| {
                        let k = n * BATCH + i;
                        let (from, to) = if k.is_multiple_of(2) {
                            (hub.to_owned(), peer(k))
                        } else {
                            (peer(k), hub.to_owned())
                        };
                        dm(&thread(k), &from, &to, &format!("{node}-{k}"), node)
                    })
                    .collect();
                let out = store.append(&batch).await.expect("append");
                acked.extend(out.iter().map(|o| new_of(o).clone()));
                tokio::task::yield_now().await;
            }
            acked
        };
        let reader = async {
            let mut seen: Vec<u64> = Vec::new();
            let mut cursor = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = a.sync(hub, Some(cursor), 200).await.expect("sync");
                for m in &page.messages {
                    assert!(
                        m.id > cursor,
                        "sync went backwards: {} after {cursor}",
                        m.id
                    );
                    cursor = m.id;
                    seen.push(m.id);
                }
                if finished && !page.more {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        };
        let writers = async {
            let r = tokio::join!(writer(&a, "a"), writer(&b, "b"));
            done.store(true, Ordering::Release);
            r
        };
        let ((acked_a, acked_b), seen) = tokio::join!(writers, reader);
        let mut all: Vec<Message> = acked_a.into_iter().chain(acked_b).collect();
        assert_eq!(all.len(), 2 * BATCHES * BATCH);
        all.sort_by_key(|m| m.id);
        let ids: Vec<u64> = all.iter().map(|m| m.id).collect();
        assert_eq!(
            ids.iter().collect::<HashSet<_>>().len(),
            ids.len(),
            "ids are unique"
        );
        assert_eq!(
            seen, ids,
            "the following reader saw every message once, in id order"
        );
        // Per thread: seq 1..n without gaps, in id order.
        let mut by_thread: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for m in &all {
            by_thread.entry(&m.thread).or_default().push(m.seq);
        }
        for (t, seqs) in by_thread {
            let want: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, want, "thread {t}: seqs in id order, gapless");
        }
    });
}

/// A node remembers its threads between batches; another node writing the same thread (or
/// creating one) in between must not make it reuse a seq or miss a participant.
#[test]
fn a_node_sees_what_another_node_wrote() {
    let url = pg::database("cache");
    rt().block_on(async {
        let a = connect(config(&url)).await;
        let b = connect(config(&url)).await;
        let send = async |s: &PgStore, from: &str, to: &str, cmid: &str| {
            let out = s.append(&[dm("ca-t", from, to, cmid, "m")]).await.unwrap();
            new_of(&out[0]).clone()
        };
        // a warms up (its guess holds from the second append on).
        let mut last = 0;
        for i in 0..3 {
            last = send(&a, "ca-al", "ca-bo", &format!("a{i}")).await.seq;
        }
        assert_eq!(last, 3);
        // b writes the same thread twice, then a continues it: a's memory says seq 3.
        assert_eq!(send(&b, "ca-bo", "ca-al", "b0").await.seq, 4);
        assert_eq!(send(&b, "ca-bo", "ca-al", "b1").await.seq, 5);
        assert_eq!(send(&a, "ca-al", "ca-bo", "a3").await.seq, 6);
        assert_eq!(send(&a, "ca-al", "ca-bo", "a4").await.seq, 7);
        // b creates a group with a's users: a, which never saw it, sends into it.
        let created = b
            .create_thread(&switchboard::store::NewThread {
                id: Some("ca-g".into()),
                kind: switchboard::store::ThreadKind::Group,
                creator: "ca-bo".into(),
                participants: vec!["ca-al".into()],
                title: None,
                created_at_ms: 1,
            })
            .await
            .unwrap();
        assert!(matches!(created, switchboard::store::Created::New(_)));
        let mut into_group = dm("ca-g", "ca-al", "", "g0", "hi");
        into_group.to = None;
        let out = a.append(&[into_group]).await.unwrap();
        assert_eq!(new_of(&out[0]).seq, 1);
        assert_eq!(send(&b, "ca-bo", "ca-al", "b2").await.seq, 8);
        assert_eq!(send(&a, "ca-al", "ca-bo", "a5").await.seq, 9);
        // None of that leaned on the unique keys to catch a stale seq.
        assert_eq!((a.append_retries(), b.append_retries()), (0, 0));
    });
}

/// Every result of a call made while the server is down is an error of the kind the bridge
/// turns into "retry later", and it comes within the configured timeouts.
fn assert_down(r: &Result<Vec<Appended>, StoreError>, took: Duration, bound: Duration) {
    match r {
        Err(StoreError::Unavailable(_)) | Err(StoreError::Timeout) => {}
        other => panic!("expected Unavailable or Timeout with the server down, got {other:?}"),
    }
    assert!(took < bound, "a call with the server down took {took:?}");
}

/// The server is stopped hard under a stream of appends and started again: calls fail fast while
/// it is down, the same store works again after (the pool reconnects), and every acked message
/// is stored exactly once, each with the ids its ack gave.
#[test]
fn server_stopped_and_restarted_under_a_stream() {
    const BATCH: usize = 8;
    /// Batches acked before the crash, and after the restart, at least.
    const BATCHES_BEFORE: usize = 5;
    const BATCHES_AFTER: usize = 10;
    /// Bound on the whole stream (the loop stops with a failure past it).
    const BATCHES_MAX: usize = 1000;
    // Each call's bound: call_timeout (3 s) plus the 1 s rollback budget, and margin.
    const CALL_BOUND: Duration = Duration::from_secs(5);
    let cluster = PgCluster::start(ClusterOptions { fsync: false });
    let url = cluster.database("fault");
    let mut cfg = config(&url);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.pool_wait_timeout = Duration::from_secs(1);
    // The pool create timeout follows connect_timeout.
    cfg.statement_timeout = Duration::from_secs(2);
    cfg.idle_in_transaction_timeout = Duration::from_secs(2);
    cfg.call_timeout = Duration::from_secs(3);
    let pool_size = cfg.pool_size;
    let progress = AtomicUsize::new(0);
    let stopped = AtomicBool::new(false);
    let (acked, batches) = std::thread::scope(|scope| {
        // The crash, from another thread, once the stream runs.
        scope.spawn(|| {
            let give_up = Instant::now() + Duration::from_secs(30);
            while progress.load(Ordering::Acquire) < BATCHES_BEFORE && Instant::now() < give_up {
                std::thread::sleep(Duration::from_millis(5));
            }
            cluster.stop_immediate();
            stopped.store(true, Ordering::Release);
        });
        rt().block_on(async {
            let store = connect(cfg).await;
            let mut acked = Vec::new();
            let (mut down_failures, mut up_failures) = (0, 0);
            let mut restarted_at = None;
            let mut slowest = Duration::ZERO;
            let mut n = 0;
            while restarted_at.is_none_or(|r| n < r + BATCHES_AFTER) {
                assert!(n < BATCHES_MAX, "the stream never got through the restart");
                let cmids: Vec<String> = (0..BATCH).map(|i| format!("f-{n}-{i}")).collect();
                loop {
                    // A client's retry: the same clientMsgIds, fresh server ids from the shard.
                    let batch: Vec<NewMessage> = cmids
                        .iter()
                        .enumerate()
                        .map(|(i, c)| {
                            let peer = format!("f-peer{}", i % 3);
                            dm(&format!("f-t{}", i % 3), "f-me", &peer, c, "m")
                        })
                        .collect();
                    let t0 = Instant::now();
                    let r = store.append(&batch).await;
                    let took = t0.elapsed();
                    if r.is_err() {
                        slowest = slowest.max(took);
                    }
                    match r {
                        Ok(out) => {
                            for o in &out {
                                match o {
                                    Appended::New { message, .. } => acked.push(message.clone()),
                                    // Committed by an attempt whose answer was lost.
                                    Appended::Duplicate(m) => acked.push(m.clone()),
                                    Appended::Refused(r) => panic!("refused: {r:?}"),
                                }
                            }
                            break;
                        }
                        Err(_) => {
                            assert_down(&r, took, CALL_BOUND);
                            if restarted_at.is_some() {
                                // A pooled connection that died with the old server, found out
                                // by its first statement.
                                up_failures += 1;
                                assert!(
                                    up_failures <= pool_size + 1,
                                    "still failing after the restart: {r:?}"
                                );
                            } else if stopped.load(Ordering::Acquire) {
                                down_failures += 1;
                                if down_failures >= 3 {
                                    let t0 = Instant::now();
                                    assert!(store.ping().await.is_err(), "ping, server down");
                                    assert!(t0.elapsed() < CALL_BOUND);
                                    cluster.restart();
                                    restarted_at = Some(n);
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                n += 1;
                progress.store(n, Ordering::Release);
            }
            store.ping().await.expect("ping after the restart");
            eprintln!(
                "fault stream: {n} batches acked, {down_failures} failed calls while down \
                 (slowest {slowest:?}), {up_failures} after the restart"
            );
            (acked, n)
        })
    });
    assert_eq!(acked.len(), BATCH * batches, "every message acked once");
    rt().block_on(async {
        let db = inspect(&url).await;
        let rows = db
            .query(
                "SELECT client_msg_id, id, count(*) OVER (PARTITION BY client_msg_id) \
                 FROM switchboard_messages WHERE sender = 'f-me'",
                &[],
            )
            .await
            .expect("read back");
        let stored: HashMap<String, (i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    (r.get::<_, i64>(1), r.get::<_, i64>(2)),
                )
            })
            .collect();
        assert_eq!(
            stored.len(),
            acked.len(),
            "nothing stored that was not acked"
        );
        for m in &acked {
            let cmid = m.client_msg_id.as_deref().unwrap_or_default();
            let Some(&(id, copies)) = stored.get(cmid) else {
                panic!("acked message {cmid} is not stored");
            };
            assert_eq!(copies, 1, "{cmid} stored once");
            assert_eq!(id as u64, m.id, "{cmid} stored with the id its ack gave");
        }
        // Seqs stayed gapless through the crash.
        let gaps: i64 = db
            .query_one(
                "SELECT count(*) FROM (SELECT thread_nid, max(seq) AS top, count(*) AS n \
                 FROM switchboard_messages GROUP BY thread_nid) s WHERE top <> n",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(gaps, 0, "per-thread seqs have no gaps");
    });
}

/// Both timeouts: the server's statement timeout (another session holds the id counter lock)
/// gives [`StoreError::Timeout`] and leaves the connection reusable; a server that stops
/// answering (frozen) gives `Timeout` at the client-side call deadline, and the store works
/// again once it answers.
#[test]
fn timeouts_are_bounded_and_recoverable() {
    let cluster = PgCluster::start(ClusterOptions { fsync: false });
    let url = cluster.database("timeouts");
    let mut cfg = config(&url);
    cfg.statement_timeout = Duration::from_millis(500);
    cfg.call_timeout = Duration::from_secs(2);
    // The pool's create timeout follows it.
    cfg.connect_timeout = Duration::from_secs(1);
    rt().block_on(async {
        let store = connect(cfg).await;
        let send = |n: usize| vec![dm("to-t", "to-a", "to-b", &format!("c{n}"), "m")];
        store.append(&send(0)).await.expect("first append");
        // Another session sits on the id counter.
        let holder = inspect(&url).await;
        holder
            .batch_execute(
                "BEGIN; SELECT value FROM switchboard_counters WHERE name = 'ids' FOR UPDATE",
            )
            .await
            .unwrap();
        for n in 1..=3 {
            let t0 = Instant::now();
            let r = store.append(&send(n)).await;
            assert_eq!(r, Err(StoreError::Timeout), "append behind a held lock");
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        }
        // Reads do not take the lock.
        store
            .sync("to-a", Some(0), 10)
            .await
            .expect("sync while locked");
        holder.batch_execute("ROLLBACK").await.unwrap();
        // Every pooled connection is clean again (no transaction left open by the timeouts).
        for n in 4..12 {
            let out = store.append(&send(n)).await.expect("append after the lock");
            assert_eq!(
                new_of(&out[0]).seq,
                n as u64 - 2,
                "the timed-out ones took no seq"
            );
        }
        // The server stops answering.
        cluster.freeze();
        let t0 = Instant::now();
        let r = store.append(&send(100)).await;
        let took = t0.elapsed();
        cluster.thaw();
        assert!(
            matches!(
                r,
                Err(StoreError::Timeout) | Err(StoreError::Unavailable(_))
            ),
            "{r:?}"
        );
        assert!(took < Duration::from_secs(4), "frozen server: {took:?}");
        // Whether that append committed is unknown to the caller; its retry says.
        let mut ok = None;
        for _ in 0..20 {
            if let Ok(out) = store.append(&send(100)).await {
                ok = Some(out);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let out = ok.expect("the store works again after the server answers");
        assert!(matches!(
            &out[0],
            Appended::New { .. } | Appended::Duplicate(_)
        ));
        store.ping().await.expect("ping");
    });
}

/// Messages per second of `append` with batches of 1, 64, 256 and 1024 (one batch in flight,
/// as the bridge commits) against a bare batched INSERT of the same rows (one INSERT over
/// unnest arrays per batch, autocommit), on a throwaway cluster with fsync on.
///
/// `cargo test --release --test store_pg -- --ignored --nocapture bench_append_vs_bare_insert`
#[test]
#[ignore = "measurement, run by hand (see its doc)"]
fn bench_append_vs_bare_insert() {
    const THREADS: usize = 1024;
    /// Each contender runs SLICE at a time, ROUNDS times, per batch size.
    const SLICE: Duration = Duration::from_secs(1);
    const ROUNDS: u32 = 4;
    let cluster = PgCluster::start(ClusterOptions { fsync: true });
    let url = cluster.database("bench");
    rt().block_on(async {
        let store = connect(config(&url)).await;
        let db = inspect(&url).await;
        let version: String = db
            .query_one("SHOW server_version", &[])
            .await
            .unwrap()
            .get(0);
        // Two sets of the same DM threads, one per contender, so that each continues its own
        // seqs; every thread exists before the clock starts.
        let thread = |side: &str, k: usize| format!("b-{side}{}", k % THREADS);
        let pair = |k: usize| (format!("b-u{}", k % THREADS), format!("b-v{}", k % THREADS));
        for side in ["append", "bare"] {
            let warm: Vec<NewMessage> = (0..THREADS)
                .map(|k| {
                    let (u, v) = pair(k);
                    dm(
                        &thread(side, k),
                        &u,
                        &v,
                        &format!("warm-{side}-{k}"),
                        "warm",
                    )
                })
                .collect();
            store.append(&warm).await.expect("create the threads");
        }
        let nids: Vec<i64> = {
            let ids: Vec<String> = (0..THREADS).map(|k| thread("bare", k)).collect();
            let rows = db
                .query(
                    "SELECT id, numeric_id FROM switchboard_threads WHERE id = ANY($1)",
                    &[&ids],
                )
                .await
                .unwrap();
            let by: HashMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            ids.iter().map(|t| by[t]).collect()
        };
        let insert = db
            .prepare(
                "INSERT INTO switchboard_messages (id, thread_nid, seq, server_msg_id, event_id, \
                 sender, recipient, client_msg_id, content, attachment_url, sent_at_ms) \
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::text[]::uuid[], \
                 $5::text[]::uuid[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                 $11::int8[])",
            )
            .await
            .unwrap();
        let content = "x".repeat(100);
        let mut k_next = 0usize;
        let mut bare_id: i64 = 1 << 40;
        let mut bare_seq = vec![1_i64; THREADS];
        println!(
            "store_pg bench: PostgreSQL {version}, fsync on, {} CPUs, {THREADS} DM threads, \
             100-byte messages, {ROUNDS} turns of {SLICE:?} each per row",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "batch  append msg/s  p50 ms  p99 ms   bare INSERT msg/s  p50 ms  p99 ms   append/bare"
        );
        for size in [1usize, 64, 256, 1024] {
            let (mut a_lat, mut a_n, mut a_time) = (Vec::new(), 0usize, Duration::ZERO);
            let (mut b_lat, mut b_n, mut b_time) = (Vec::new(), 0usize, Duration::ZERO);
            // Turns, so that both contenders see the same machine (other work on it varies).
            for _ in 0..ROUNDS {
                // append
                let t0 = Instant::now();
                while t0.elapsed() < SLICE {
                    let batch: Vec<NewMessage> = (0..size)
                        .map(|i| {
                            let k = k_next + i;
                            let (u, v) = pair(k);
                            let (from, to) = if k.is_multiple_of(2) { (u, v) } else { (v, u) };
                            dm(
                                &thread("append", k),
                                &from,
                                &to,
                                &format!("bench-{k}"),
                                &content,
                            )
                        })
                        .collect();
                    k_next += size;
                    let t = Instant::now();
                    store.append(&batch).await.expect("append");
                    a_lat.push(t.elapsed());
                    a_n += size;
                }
                a_time += t0.elapsed();
                // bare INSERT of the same shape of rows
                let t0 = Instant::now();
                while t0.elapsed() < SLICE {
                    let mut cols = BareRows::default();
                    for i in 0..size {
                        let k = k_next + i;
                        let (u, v) = pair(k);
                        let (from, to) = if k.is_multiple_of(2) { (u, v) } else { (v, u) };
                        bare_id += 1;
                        bare_seq[k % THREADS] += 1;
                        cols.id.push(bare_id);
                        cols.nid.push(nids[k % THREADS]);
                        cols.seq.push(bare_seq[k % THREADS]);
                        cols.smid.push(uuid::Uuid::now_v7().to_string());
                        cols.eid.push(uuid::Uuid::now_v7().to_string());
                        cols.sender.push(from);
                        cols.recipient.push(to);
                        cols.cmid.push(format!("bare-{k}"));
                        cols.content.push(content.clone());
                        cols.attachment.push(None);
                        cols.sent_at.push(1_700_000_000_000);
                    }
                    k_next += size;
                    let t = Instant::now();
                    db.execute(
                        &insert,
                        &[
                            &cols.id,
                            &cols.nid,
                            &cols.seq,
                            &cols.smid,
                            &cols.eid,
                            &cols.sender,
                            &cols.recipient,
                            &cols.cmid,
                            &cols.content,
                            &cols.attachment,
                            &cols.sent_at,
                        ],
                    )
                    .await
                    .expect("bare insert");
                    b_lat.push(t.elapsed());
                    b_n += size;
                }
                b_time += t0.elapsed();
            }
            let append_rate = a_n as f64 / a_time.as_secs_f64();
            let bare_rate = b_n as f64 / b_time.as_secs_f64();
            let (a50, a99) = percentiles(&mut a_lat);
            let (b50, b99) = percentiles(&mut b_lat);
            println!(
                "{size:>5}  {append_rate:>12.0}  {a50:>6.2}  {a99:>6.2}   {bare_rate:>17.0}  \
                 {b50:>6.2}  {b99:>6.2}   {:>10.0} %",
                100.0 * append_rate / bare_rate
            );
        }
    });
    drop(cluster);
}

#[derive(Default)]
struct BareRows {
    id: Vec<i64>,
    nid: Vec<i64>,
    seq: Vec<i64>,
    smid: Vec<String>,
    eid: Vec<String>,
    sender: Vec<String>,
    recipient: Vec<String>,
    cmid: Vec<String>,
    content: Vec<String>,
    attachment: Vec<Option<String>>,
    sent_at: Vec<i64>,
}

/// p50 and p99 in milliseconds.
fn percentiles(lat: &mut [Duration]) -> (f64, f64) {
    lat.sort_unstable();
    let at = |q: f64| {
        let i = ((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    (at(0.50), at(0.99))
}
