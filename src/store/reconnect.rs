//! A store that is connected in the background: [`Reconnecting`] wraps a store whose setup
//! (connect, apply migrations) can fail, so the node starts and serves while the database is
//! down, and picks it up when it answers.
//!
//! Until the setup succeeds every call fails at once with [`StoreError::Unavailable`] (a DM
//! gets an error and no ack, REST a 503, `/ready` 503) and a setup attempt runs in the
//! background, again after a capped, jittered backoff while it fails. Once set up, the inner
//! store handles lost connections itself (PostgreSQL: the pool replaces broken connections).

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use super::*;

/// First retry delay after a failed setup; doubled per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest delay between setup attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The delay before attempt `n` (0-based) of a failing setup: doubling from [`BACKOFF_MIN`],
/// capped at [`BACKOFF_MAX`], with up to a quarter taken off at random (`jitter` in 0..1) so
/// that nodes restarted together do not retry in step.
pub fn backoff(n: u32, jitter: f64) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << n.min(16))
        .min(BACKOFF_MAX);
    base.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

/// See the module doc. `F` makes one setup attempt.
pub struct Reconnecting<S, F> {
    inner: RefCell<Option<Rc<S>>>,
    setup: Rc<F>,
    trying: Rc<Cell<bool>>,
    slot: Rc<RefCell<Option<Rc<S>>>>,
    kind: &'static str,
}

impl<S, F, Fut> Reconnecting<S, F>
where
    S: Store + 'static,
    F: Fn() -> Fut + 'static,
    Fut: Future<Output = Result<S>> + 'static,
{
    /// Start the first setup attempt (must be called inside the bridge's `LocalSet`).
    pub fn new(kind: &'static str, setup: F) -> Self {
        let r = Reconnecting {
            inner: RefCell::new(None),
            setup: Rc::new(setup),
            trying: Rc::new(Cell::new(false)),
            slot: Rc::new(RefCell::new(None)),
            kind,
        };
        r.try_setup();
        r
    }

    /// Whether the setup has succeeded.
    pub fn is_set_up(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Rc<S>> {
        if let Some(s) = self.inner.borrow().as_ref() {
            return Some(s.clone());
        }
        let s = self.slot.borrow().clone();
        if let Some(s) = &s {
            *self.inner.borrow_mut() = Some(s.clone());
        }
        s
    }

    fn try_setup(&self) {
        if self.trying.replace(true) {
            return;
        }
        let setup = self.setup.clone();
        let trying = self.trying.clone();
        let slot = self.slot.clone();
        let kind = self.kind;
        tokio::task::spawn_local(async move {
            let mut n = 0u32;
            loop {
                match setup().await {
                    Ok(s) => {
                        *slot.borrow_mut() = Some(Rc::new(s));
                        tracing::info!(store = kind, attempts = n + 1, "message store set up");
                        break;
                    }
                    Err(e) => {
                        let wait = backoff(n, jitter());
                        tracing::warn!(store = kind, error = %e, retry_in_ms = wait.as_millis() as u64, "message store setup failed; direct messages get errors until it succeeds");
                        n = n.saturating_add(1);
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            trying.set(false);
        });
    }

    fn get(&self) -> Result<Rc<S>> {
        match self.current() {
            Some(s) => Ok(s),
            None => {
                self.try_setup();
                Err(StoreError::Unavailable("not connected yet".into()))
            }
        }
    }
}

fn jitter() -> f64 {
    (uuid::Uuid::new_v4().as_u128() % 1024) as f64 / 1024.0
}

impl<S, F, Fut> Store for Reconnecting<S, F>
where
    S: Store + 'static,
    F: Fn() -> Fut + 'static,
    Fut: Future<Output = Result<S>> + 'static,
{
    fn kind(&self) -> &'static str {
        self.kind
    }
    async fn append(&self, batch: &[NewMessage]) -> Result<Vec<Appended>> {
        self.get()?.append(batch).await
    }
    async fn create_thread(&self, new: &NewThread) -> Result<Created> {
        self.get()?.create_thread(new).await
    }
    async fn threads(
        &self,
        user: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<ThreadView>> {
        self.get()?.threads(user, before, limit).await
    }
    async fn thread(&self, user: &str, thread: &ThreadRef) -> Result<Lookup<ThreadView>> {
        self.get()?.thread(user, thread).await
    }
    async fn messages(
        &self,
        user: &str,
        thread: &ThreadRef,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Lookup<Page<Message>>> {
        self.get()?.messages(user, thread, before, limit).await
    }
    async fn mark(&self, req: &MarkRequest) -> Result<Lookup<Marked>> {
        self.get()?.mark(req).await
    }
    async fn sync(&self, user: &str, since: Option<u64>, limit: usize) -> Result<SyncPage> {
        self.get()?.sync(user, since, limit).await
    }
    async fn store_notification(&self, n: &NewNotification) -> Result<Noted> {
        self.get()?.store_notification(n).await
    }
    async fn notifications(
        &self,
        user: &str,
        unread_only: bool,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<Notification>> {
        self.get()?
            .notifications(user, unread_only, before, limit)
            .await
    }
    async fn notification_read(&self, user: &str, id: u64) -> Result<Lookup<Notification>> {
        self.get()?.notification_read(user, id).await
    }
    async fn notifications_read_all(&self, user: &str) -> Result<u64> {
        self.get()?.notifications_read_all(user).await
    }
    async fn mark_produced(&self, ids: &[u64]) -> Result<()> {
        self.get()?.mark_produced(ids).await
    }
    async fn produced(&self, ids: &[u64]) -> Result<Vec<bool>> {
        self.get()?.produced(ids).await
    }
    async fn ping(&self) -> Result<()> {
        self.get()?.ping().await
    }
    async fn co_participants(
        &self,
        user: &str,
        threads_max: usize,
        limit: usize,
    ) -> Result<crate::store::CoParticipants> {
        self.get()?.co_participants(user, threads_max, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_fail_fast_until_the_setup_succeeds_then_reach_the_store() {
        use std::cell::Cell;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let attempts = Rc::new(Cell::new(0u32));
            let a = attempts.clone();
            let r = Reconnecting::new("memory", move || {
                let a = a.clone();
                async move {
                    a.set(a.get() + 1);
                    if a.get() < 3 {
                        Err(StoreError::Unavailable("refused".into()))
                    } else {
                        Ok(super::super::memory::MemoryStore::new(1 << 20))
                    }
                }
            });
            // Not set up: an error at once, never a wait.
            assert!(matches!(r.ping().await, Err(StoreError::Unavailable(_))));
            assert!(!r.is_set_up());
            // Two failures: retried after BACKOFF_MIN and twice that (less jitter).
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !r.is_set_up() {
                assert!(std::time::Instant::now() < deadline, "never set up");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(attempts.get(), 3);
            r.ping().await.unwrap();
            let out = r
                .append(&[super::super::conformance::dm("t", "a", "b", "c", "x")])
                .await
                .unwrap();
            assert!(matches!(out[0], Appended::New { .. }));
            assert_eq!(r.kind(), "memory");
        });
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_down() {
        assert_eq!(backoff(0, 0.0), BACKOFF_MIN);
        assert_eq!(backoff(1, 0.0), BACKOFF_MIN * 2);
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX);
        assert_eq!(backoff(30, 1.0), BACKOFF_MAX.mul_f64(0.75));
        assert!(backoff(3, 0.5) < backoff(3, 0.0));
    }
}
