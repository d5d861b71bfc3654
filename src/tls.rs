//! TLS on the node's own listener (`tls_port`): the certificate and key, the rustls server
//! config built from them field by field, its reload on SIGHUP, and the node-wide counters.
//!
//! Owns: reading `tls_cert_file` and `tls_key_file` (PEM, through rustls-pki-types' parser,
//! already in the tree through rustls; no rustls-pemfile), building [`rustls::ServerConfig`],
//! and swapping it on reload ([`ServerTls::reload`]): a connection keeps the `Arc` of the
//! config it was accepted with, so a reload changes what new connections get and never drops
//! or alters an existing one; a reload that fails keeps the config in use. It touches no
//! socket: each shard drives one `rustls::ServerConnection` per TLS connection sans-IO over
//! its own read buffer (`shard::tls`), and picks up a new config at its next accept through a
//! generation number (one atomic load per TLS accept, a lock only after a reload).
//!
//! Cost, measured (docs/BENCHMARKS.md, "TLS cost"): an idle TLS connection holds rustls'
//! connection state and its 4 KiB receive buffer besides the plain connection's bytes, and
//! each full handshake is an ECDHE plus a signature on the shard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

use crate::bridge::redis::tls::{pem_certs, read_pem, KeyError};
use crate::config::Config;
use crate::limits::{TLS_SESSION_CACHE_ENTRIES, TLS_TLS13_TICKETS};

/// The TLS listener's current config and counters, shared by the shards (in the `Node`).
pub struct ServerTls {
    pub cert_file: String,
    pub key_file: String,
    current: Mutex<Arc<rustls::ServerConfig>>,
    /// Bumped after every successful reload (the shards compare it with theirs at accept).
    generation: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerTls {{ cert: {}, key: {} }}",
            self.cert_file, self.key_file
        )
    }
}

impl ServerTls {
    /// The TLS listener of `cfg`: None when `tls_port` is 0. Reads and checks both files now,
    /// so a bad certificate or key stops the start (the error names the key).
    pub fn from_config(cfg: &Config) -> Result<Option<ServerTls>, KeyError> {
        if cfg.tls_port == 0 {
            return Ok(None);
        }
        let (Some(cert_file), Some(key_file)) = (&cfg.tls_cert_file, &cfg.tls_key_file) else {
            // Config::validate refuses this; say it again rather than panic.
            return Err((
                "tls_cert_file",
                "tls_port is set: tls_cert_file and tls_key_file are both needed".into(),
            ));
        };
        let config = load(cert_file, key_file)?;
        Ok(Some(ServerTls {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: Mutex::new(config),
            generation: AtomicU64::new(1),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }))
    }

    /// Read both files again (SIGHUP). On success new connections get the new certificate;
    /// on failure the one in use stays. Either way it is counted; the caller logs.
    pub fn reload(&self) -> Result<(), KeyError> {
        match load(&self.cert_file, &self.key_file) {
            Ok(config) => {
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = config;
                self.generation.fetch_add(1, Ordering::Release);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// The generation of the current config (changes after each successful reload).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current config and its generation (read at least as new as the generation).
    pub fn current(&self) -> (u64, Arc<rustls::ServerConfig>) {
        let gen = self.generation();
        let c = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (gen, c)
    }
}

/// Build the listener's rustls config from the two PEM files. Every field a deployment could
/// care about is set here, not inherited: TLS 1.3 and 1.2 (ring's suites), no client
/// certificates, ALPN `http/1.1` only (WebSocket upgrades and the HTTP endpoints are HTTP/1.1),
/// a bounded session cache for resumption, no 0-RTT data, no key log.
pub fn load(cert_path: &str, key_path: &str) -> Result<Arc<rustls::ServerConfig>, KeyError> {
    let cert = read_pem("tls_cert_file", cert_path)?;
    let key = read_pem("tls_key_file", key_path)?;
    let chain = pem_certs("tls_cert_file", cert_path, &cert)?;
    let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        (
            "tls_key_file",
            format!("{key_path}: not a PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ("tls_cert_file", format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, der)
        .map_err(|e| {
            (
                "tls_key_file",
                format!("{key_path} does not suit {cert_path}: {e}"),
            )
        })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.ignore_client_order = false;
    c.max_fragment_size = None;
    c.session_storage = rustls::server::ServerSessionMemoryCache::new(TLS_SESSION_CACHE_ENTRIES);
    // Stateless tickets stay off (the builder's ticketer produces none): resumption is by the
    // bounded cache above, whose ids TLS 1.3 hands out as tickets.
    c.send_tls13_tickets = TLS_TLS13_TICKETS;
    c.max_early_data_size = 0;
    c.send_half_rtt_data = false;
    c.key_log = Arc::new(rustls::NoKeyLog);
    c.enable_secret_extraction = false;
    Ok(Arc::new(c))
}

/// Prometheus lines of the node-wide TLS counters (rendered when `tls_port` is set; the
/// per-shard handshake counters and the open-connection gauge are in the shard table).
pub fn render(t: &ServerTls, out: &mut String) {
    use std::fmt::Write as _;
    for (name, help, v) in [
        (
            "switchboard_tls_reloads_total",
            "SIGHUP reloads of tls_cert_file and tls_key_file that took effect",
            t.reloads_ok.load(Ordering::Relaxed),
        ),
        (
            "switchboard_tls_reload_failures_total",
            "SIGHUP reloads that failed (the certificate in use was kept)",
            t.reloads_failed.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_state_is_boxed_off_the_client() {
        // What one TLS connection's side-table entry points at, before rustls' heap buffers
        // (docs/BENCHMARKS.md, "TLS cost", has the measured whole).
        let n = std::mem::size_of::<rustls::ServerConnection>();
        eprintln!("rustls::ServerConnection: {n} B inline");
        assert!(n <= 4096, "rustls::ServerConnection is {n} B");
    }

    #[test]
    fn missing_and_garbage_files_name_their_key() {
        // Not the Redis TLS tests' directory: they run in parallel and remove theirs.
        let dir = std::env::temp_dir().join(format!("sb-listener-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        let junk = junk.display().to_string();
        let e = load("/nonexistent/cert.pem", &junk).unwrap_err();
        assert_eq!(e.0, "tls_cert_file", "{e:?}");
        let e = load(&junk, &junk).unwrap_err();
        assert_eq!(e.0, "tls_cert_file", "{e:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
