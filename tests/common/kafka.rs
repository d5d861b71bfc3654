//! Kafka-protocol brokers for the Kafka tests, and a plain client to look at what they hold.
//!
//! Owns: running a real `tansu` broker on a free loopback port ([`Tansu`]: in-memory storage;
//! killed, frozen, thawed and restarted on the same port by the fault tests; killed on drop, its
//! log printed when a test fails), librdkafka's in-process mock cluster ([`Mock`]:
//! real TCP listeners on loopback, with brokers taken down and request errors injected), and
//! the test's own view of a topic: [`create_topic`], [`produce`], [`read_all`] and a consumer
//! group probe ([`group_consumer`]). The server under test connects to [`Tansu::bootstrap`] or
//! [`Mock::bootstrap`] through its environment, like to any broker.
//!
//! A missing `tansu` binary fails the test with the command that installs it: a Kafka test
//! never passes by skipping. Every wait here is bounded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};

use super::proxy::Proxy;

/// The tansu release the tests run against (tests/run-all.sh installs the same one).
pub const TANSU_VERSION: &str = "0.6.0";
/// How long a broker may take to answer a metadata request after spawn.
pub const BROKER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one admin, produce or metadata request of the helpers may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`read_all`] waits by default for the records a test expects.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// One poll of the helpers' consumers.
const POLL_SLICE: Duration = Duration::from_millis(100);
/// Spawn attempts when the picked port was taken between the probe and the broker's bind.
const START_ATTEMPTS_MAX: usize = 5;
/// Bytes of a broker's log printed when a test fails.
const LOG_TAIL_BYTES_MAX: usize = 16 << 10;

/// The environment variables `tansu broker` 0.6.0 reads its settings from (its `--help`).
const TANSU_ENV: &[&str] = &[
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "DATA_LAKE",
    "ICEBERG_CATALOG",
    "ICEBERG_NAMESPACE",
    "ICEBERG_WAREHOUSE",
    "DELTA_DATABASE",
];

static BROKER_SEQ: AtomicUsize = AtomicUsize::new(0);
static GROUP_SEQ: AtomicUsize = AtomicUsize::new(0);

/// The install command named by every "tansu is missing" failure.
pub fn tansu_install_command() -> String {
    format!(
        "cargo install tansu --version {TANSU_VERSION} --locked --features dynostore,postgres \
         --root ~/.cache/switchboard/tansu-{TANSU_VERSION}   (about 15 minutes cold; or run \
         `bash tests/run-all.sh`, which installs it there)"
    )
}

/// Where the `tansu` binary is: `SWITCHBOARD_TEST_TANSU` (set by tests/run-all.sh), else
/// `~/.cache/switchboard/tansu-<version>/bin/tansu`, else `tansu` on PATH.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHBOARD_TEST_TANSU") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SWITCHBOARD_TEST_TANSU={} is not a file: point it at a tansu {TANSU_VERSION} \
             binary or unset it; install one with {}",
            p.display(),
            tansu_install_command()
        );
        return p;
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(format!(
            ".cache/switchboard/tansu-{TANSU_VERSION}/bin/tansu"
        ));
        if p.is_file() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let p = d.join("tansu");
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "the tansu Kafka broker is not installed: the Kafka tests need it. Install it with {}, \
         or point SWITCHBOARD_TEST_TANSU at a tansu binary",
        tansu_install_command()
    )
}

/// One `tansu broker` process on a loopback port (killed on drop; its log is printed when the
/// test is failing).
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    /// `host:port` in its metadata: its own listener, or a proxy's.
    advertised: String,
    storage: String,
    bin: PathBuf,
    log_path: PathBuf,
    frozen: bool,
}

impl Tansu {
    /// A broker with in-memory storage (`memory://tansu/`): records live as long as the
    /// process.
    pub fn start() -> Tansu {
        Tansu::launch(|_| None).0
    }

    /// A broker reached through a [`Proxy`]: it advertises the proxy's address in its metadata,
    /// so a client that bootstraps from [`Proxy::addr`] sends everything through the proxy
    /// (bootstrapping through a proxy alone is not enough: Kafka clients then connect to the
    /// advertised address). Give the client `proxy.addr()`, not [`Tansu::bootstrap`].
    pub fn start_proxied() -> (Tansu, Proxy) {
        let (t, p) = Tansu::launch(|port| Some(Proxy::start(&format!("127.0.0.1:{port}"))));
        (t, p.expect("proxy"))
    }

    /// Start on a free port; `proxy(port)` may put a proxy in front, which is advertised.
    fn launch(proxy: impl Fn(u16) -> Option<Proxy>) -> (Tansu, Option<Proxy>) {
        let bin = tansu_bin();
        let seq = BROKER_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut t = Tansu {
            child: None,
            port: 0,
            advertised: String::new(),
            storage: "memory://tansu/".to_owned(),
            bin,
            log_path: PathBuf::new(),
            frozen: false,
        };
        for _ in 0..START_ATTEMPTS_MAX {
            t.port = super::free_port();
            let p = proxy(t.port);
            t.advertised = p.as_ref().map_or_else(|| t.bootstrap(), Proxy::addr);
            t.log_path = std::env::temp_dir().join(format!(
                "switchboard-tansu-{}-{seq}-{}.log",
                std::process::id(),
                t.port
            ));
            if t.spawn_and_wait() {
                return (t, p);
            }
            if !t.logs().contains("Address already in use") {
                break;
            }
        }
        panic!(
            "tansu ({}) did not start with storage {}; its log:\n{}",
            t.bin.display(),
            t.storage,
            t.logs()
        );
    }

    /// Spawn on `self.port` and wait until it answers metadata; false if it exited first.
    fn spawn_and_wait(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let err = log.try_clone().expect("clone log file");
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let mut cmd = Command::new(&self.bin);
        // Hermetic: none of the settings tansu reads from its environment apply.
        for k in TANSU_ENV {
            cmd.env_remove(k);
        }
        cmd.arg("broker")
            .args(["--listener-url", &listener])
            .args([
                "--advertised-listener-url",
                &format!("tcp://{}", self.advertised),
            ])
            .args(["--storage-engine", &self.storage])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.frozen = false;
        let deadline = Instant::now() + BROKER_START_TIMEOUT;
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            if metadata_ok(&self.bootstrap()) {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not answer metadata on {} within {BROKER_START_TIMEOUT:?}; its \
                 log:\n{}",
                self.bootstrap(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers` (and `SWITCHBOARD_KAFKA_BROKERS`).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (every start of this broker appends to it).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory preconditions; the pid is our own unreaped child.
            unsafe { libc::kill(pid, sig) };
        }
    }

    /// SIGKILL the broker and reap it (a crash: connections reset, nothing flushed).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.frozen = false;
    }

    /// SIGSTOP: the broker keeps its sockets but answers nothing (a hung broker; requests time
    /// out instead of failing).
    pub fn freeze(&mut self) {
        self.signal(libc::SIGSTOP);
        self.frozen = true;
    }

    /// SIGCONT after [`Tansu::freeze`].
    pub fn thaw(&mut self) {
        self.signal(libc::SIGCONT);
        self.frozen = false;
    }

    /// Whether the process is running (not killed, not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kill the broker if it runs, then start it again on the same port with the same storage
    /// and wait until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + BROKER_START_TIMEOUT;
        // The old listener is gone with the process; retry while the kernel still holds it.
        while !self.spawn_and_wait() {
            assert!(
                Instant::now() < deadline,
                "tansu did not restart on port {}; its log:\n{}",
                self.port,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if self.frozen {
            self.thaw();
        }
        self.kill();
        if std::thread::panicking() {
            let log = self.logs();
            let start = log.len().saturating_sub(LOG_TAIL_BYTES_MAX);
            let start = (start..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            eprintln!(
                "---- tansu on port {} (storage {}), log tail ({}):\n{}",
                self.port,
                self.storage,
                self.log_path.display(),
                &log[start..]
            );
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// What a test needs of either broker kind, so one test body runs against both.
pub trait Broker {
    /// `host:port[,host:port...]`, for `bootstrap.servers` (and `SWITCHBOARD_KAFKA_BROKERS`).
    fn bootstrap(&self) -> String;
    /// Create `name` with `partitions` partitions and wait until every one has a leader.
    fn create_topic(&self, name: &str, partitions: i32);
}

impl Broker for Tansu {
    fn bootstrap(&self) -> String {
        Tansu::bootstrap(self)
    }
    fn create_topic(&self, name: &str, partitions: i32) {
        create_topic(&Tansu::bootstrap(self), name, partitions)
    }
}

impl Broker for Mock {
    fn bootstrap(&self) -> String {
        Mock::bootstrap(self)
    }
    fn create_topic(&self, name: &str, partitions: i32) {
        Mock::create_topic(self, name, partitions)
    }
}

/// librdkafka's mock cluster, in this process: `brokers` real TCP listeners on loopback
/// (broker ids `1..=brokers`), auto-creating topics. Not `Send`: keep it on the test's thread.
pub struct Mock {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
}

impl Mock {
    pub fn start(brokers: i32) -> Mock {
        let cluster = MockCluster::new(brokers)
            .unwrap_or_else(|e| panic!("librdkafka mock cluster with {brokers} brokers: {e}"));
        Mock { cluster }
    }

    /// The brokers' `host:port` list, for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Create `name` with `partitions` partitions (replication 1) in the mock itself (it does
    /// not implement the CreateTopics request: [`create_topic`] times out against it), then
    /// wait until its metadata shows them led.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        self.cluster
            .create_topic(name, partitions, 1)
            .unwrap_or_else(|e| panic!("mock create_topic {name}: {e}"));
        wait_topic(&self.bootstrap(), name, partitions);
    }

    /// Take broker `id` down: its connections close and new ones are refused.
    pub fn broker_down(&self, id: i32) {
        self.cluster
            .broker_down(id)
            .unwrap_or_else(|e| panic!("mock broker_down {id}: {e}"));
    }

    pub fn broker_up(&self, id: i32) {
        self.cluster
            .broker_up(id)
            .unwrap_or_else(|e| panic!("mock broker_up {id}: {e}"));
    }

    /// Take every broker down (`1..=brokers`).
    pub fn all_down(&self, brokers: i32) {
        (1..=brokers).for_each(|id| self.broker_down(id));
    }

    pub fn all_up(&self, brokers: i32) {
        (1..=brokers).for_each(|id| self.broker_up(id));
    }

    /// The next Produce requests, one per error, fail with these errors (in order), whatever
    /// broker gets them.
    pub fn fail_produce(&self, errors: &[RDKafkaRespErr]) {
        self.cluster.request_errors(RDKafkaApiKey::Produce, errors);
    }

    /// Forget Produce errors not yet used up.
    pub fn clear_produce_errors(&self) {
        self.cluster.clear_request_errors(RDKafkaApiKey::Produce);
    }
}

/// One record as [`read_all`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    pub offset: i64,
}

impl Record {
    /// The key as UTF-8 (panics when it is missing or not UTF-8).
    pub fn key_str(&self) -> &str {
        std::str::from_utf8(self.key.as_deref().expect("record has a key")).expect("UTF-8 key")
    }

    /// The value as UTF-8 (panics when it is missing or not UTF-8).
    pub fn value_str(&self) -> &str {
        std::str::from_utf8(self.value.as_deref().expect("record has a value"))
            .expect("UTF-8 value")
    }

    /// The value parsed as JSON.
    pub fn value_json(&self) -> serde_json::Value {
        serde_json::from_str(self.value_str()).expect("JSON value")
    }

    /// The first header called `name`, as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| std::str::from_utf8(v).expect("UTF-8 header value"))
    }
}

/// A client config for `bootstrap` with every option a helper relies on set explicitly.
pub fn base_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        // IPv4 only: every broker here listens on 127.0.0.1.
        .set("broker.address.family", "v4")
        .set("socket.timeout.ms", REQUEST_TIMEOUT.as_millis().to_string())
        // Quick reconnects: the fault tests restart brokers.
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .set("log_level", "3");
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime for a Kafka helper")
}

/// Whether `bootstrap` answers a metadata request within a second.
fn metadata_ok(bootstrap: &str) -> bool {
    let Ok(c) = base_config(bootstrap).create::<BaseConsumer>() else {
        return false;
    };
    c.fetch_metadata(None, Duration::from_secs(1)).is_ok()
}

/// Create `name` with `partitions` partitions (replication 1) through the admin API
/// (CreateTopics: tansu, not the mock, see [`Mock::create_topic`]), then
/// wait until the broker's metadata shows every partition with a leader. An existing topic is
/// fine.
pub fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        base_config(bootstrap).create().expect("admin client");
    let opts = AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT));
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = runtime()
        .block_on(admin.create_topics([&topic], &opts))
        .unwrap_or_else(|e| panic!("create topic {name} on {bootstrap}: {e}"));
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => panic!("create topic {t} on {bootstrap}: {e}"),
        }
    }
    wait_topic(bootstrap, name, partitions);
}

/// Wait until the metadata of `bootstrap` shows `topic` with `partitions` led partitions.
pub fn wait_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let c: BaseConsumer = base_config(bootstrap).create().expect("metadata client");
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut last = String::new();
    loop {
        match c.fetch_metadata(Some(topic), Duration::from_secs(1)) {
            Ok(md) => {
                if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
                    let led = t.partitions().iter().filter(|p| p.leader() >= 0).count();
                    if t.error().is_none() && led as i32 == partitions {
                        return;
                    }
                    last = format!(
                        "error {:?}, {led} of {} partitions led",
                        t.error(),
                        t.partitions().len()
                    );
                }
            }
            Err(e) => last = e.to_string(),
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} on {bootstrap} has no {partitions} led partitions after \
             {REQUEST_TIMEOUT:?}: {last}"
        );
        std::thread::sleep(POLL_SLICE);
    }
}

/// Produce one record (acks=all, idempotent) and wait for its delivery: (partition, offset).
pub fn produce(
    bootstrap: &str,
    topic: &str,
    key: Option<&str>,
    value: &str,
    headers: &[(&str, &str)],
) -> (i32, i64) {
    try_produce(bootstrap, topic, key, value, headers, READ_TIMEOUT)
        .unwrap_or_else(|e| panic!("produce to {topic} on {bootstrap}: {e}"))
}

/// [`produce`] giving up after `timeout` (librdkafka's `message.timeout.ms`): the delivery
/// error as text when it failed.
pub fn try_produce(
    bootstrap: &str,
    topic: &str,
    key: Option<&str>,
    value: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(i32, i64), String> {
    let producer: FutureProducer = base_config(bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.as_millis().to_string())
        .set("linger.ms", "0")
        .set("retry.backoff.ms", "50")
        .create()
        .expect("producer");
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(topic).payload(value).headers(hs);
    if let Some(k) = key {
        record = record.key(k);
    }
    runtime()
        .block_on(producer.send(record, timeout))
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e.to_string())
}

fn to_record<M: Message>(m: &M) -> Record {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Record {
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().map(<[u8]>::to_vec),
        headers,
        partition: m.partition(),
        offset: m.offset(),
    }
}

/// A group id no other consumer of this process uses.
pub fn unique_group(label: &str) -> String {
    format!(
        "itest-{}-{}-{label}",
        std::process::id(),
        GROUP_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Every record of `topic` from the beginning: a fresh consumer (unique group, nothing
/// committed) assigned every partition, reading until it has at least `expect_at_least`
/// records and has reached the high watermark of every partition. Sorted by (partition,
/// offset). Panics with what it has when `timeout` passes first.
pub fn read_all(
    bootstrap: &str,
    topic: &str,
    expect_at_least: usize,
    timeout: Duration,
) -> Vec<Record> {
    let c: BaseConsumer = base_config(bootstrap)
        .set("group.id", unique_group("read-all"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Nothing here is transactional: a record counts once the broker acked it.
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("reader");
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(1));
        if let Ok(md) = &md {
            if let Some(t) = md.topics().iter().find(|t| t.name() == topic) {
                if t.error().is_none() && !t.partitions().is_empty() {
                    break t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "read_all: topic {topic} on {bootstrap} has no partitions after {timeout:?}: {:?}",
            md.map(|m| m.topics().iter().map(|t| t.error()).collect::<Vec<_>>())
        );
        std::thread::sleep(POLL_SLICE);
    };
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("assignment");
    }
    c.assign(&tpl).expect("assign");
    let mut out: Vec<Record> = Vec::new();
    let mut next: Vec<i64> = vec![0; partitions.len()];
    loop {
        match c.poll(POLL_SLICE) {
            Some(Ok(m)) => {
                let r = to_record(&m);
                if let Some(i) = partitions.iter().position(|&p| p == r.partition) {
                    next[i] = next[i].max(r.offset + 1);
                }
                out.push(r);
                continue;
            }
            Some(Err(e)) => eprintln!("read_all {topic}: {e}"),
            None => {}
        }
        if out.len() >= expect_at_least {
            let caught_up = partitions.iter().enumerate().all(|(i, &p)| {
                match c.fetch_watermarks(topic, p, Duration::from_secs(1)) {
                    Ok((_, high)) => next[i] >= high || (high == 0),
                    Err(_) => false,
                }
            });
            if caught_up {
                out.sort_by_key(|r| (r.partition, r.offset));
                return out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "read_all: {} of at least {expect_at_least} records of {topic} on {bootstrap} \
             after {timeout:?}: {out:?}",
            out.len()
        );
    }
}

/// A consumer in group `group` subscribed to `topic`: offsets committed only by hand
/// (`commit_message`), reading from the beginning when the group has no committed offset.
pub fn group_consumer(bootstrap: &str, group: &str, topic: &str) -> BaseConsumer {
    let c: BaseConsumer<DefaultConsumerContext> = base_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Nothing here is transactional: a record counts once the broker acked it.
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("group consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// Poll `c` until it returns a record (panics after `timeout`; errors are printed and skipped).
pub fn poll_one(c: &BaseConsumer, timeout: Duration) -> Record {
    let deadline = Instant::now() + timeout;
    loop {
        match c.poll(POLL_SLICE) {
            Some(Ok(m)) => return to_record(&m),
            Some(Err(e)) => eprintln!("poll_one: {e}"),
            None => {}
        }
        assert!(Instant::now() < deadline, "no record within {timeout:?}");
    }
}

/// Commit `next_offset` (the offset of the next record to read) for `topic`/`partition` of
/// `c`'s group, synchronously.
pub fn commit(c: &BaseConsumer, topic: &str, partition: i32, next_offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset))
        .expect("commit list");
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync)
        .unwrap_or_else(|e| panic!("commit {topic}/{partition} at {next_offset}: {e}"));
}

/// The committed offsets of `group` on `topic`'s `partitions` (`None`: nothing committed).
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let c: BaseConsumer = base_config(bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("offsets client");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c
        .committed_offsets(tpl, REQUEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("committed offsets of {group} on {topic}: {e}"));
    got.elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
        .collect()
}
