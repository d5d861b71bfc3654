//! TLS to Redis (`rediss://` in `redis_url`): what the node's Redis clients trust and
//! present, read and checked once at start ([`RedisTls::from_config`]), and the doctor's own
//! handshake check ([`RedisTls::handshake`]).
//!
//! Owns: reading `redis_tls_ca_file`, `redis_tls_cert_file` and `redis_tls_key_file`;
//! installing rustls's crypto provider (ring) for the process; giving a URL's
//! [`ConnectionInfo`] those certificates ([`connection_info`], [`at_addr`]). It opens none of
//! the server's connections (they are the bridge's, [`super`], and every one of them goes
//! through here), and the TLS itself is the redis crate's (tokio-rustls over rustls).
//!
//! What the crate does with it, per connection: it builds a rustls client config, reading the
//! system's trust store again first (even when a CA file replaces it, and a store with an
//! unreadable entry fails the connect: [`RedisTls::from_config`] reads it once at start to
//! find that), then one TLS handshake (a round trip more than plain TCP, and a signature
//! check). Connections are long-lived (two per Redis, two per master of a Redis Cluster plus
//! the cluster client's), so this is paid at connect and reconnect only; records then cost
//! AES-GCM or ChaCha20 per byte
//! (tuning/README.md, "TLS to Redis").

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use redis::{ClientTlsConfig, ConnectionAddr, ConnectionInfo, RedisResult, TlsCertificates};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::cluster::UrlTls;
use crate::config::Config;

/// Largest PEM file read (the whole Mozilla root set is about 220 KB).
pub const PEM_FILE_BYTES_MAX: u64 = 1 << 20;

/// Bytes of the answer to the doctor's PING over its own TLS session that are read.
const PING_REPLY_BYTES_MAX: usize = 256;

/// A config key and what is wrong with it.
pub type KeyError = (&'static str, String);

/// TLS for the node's Redis connections: how the server is checked, and the certificates.
#[derive(Clone)]
pub struct RedisTls {
    /// [`UrlTls::Verified`] or [`UrlTls::Insecure`] (never `Plain`: then there is none).
    pub verify: UrlTls,
    /// `redis_tls_ca_file`; None = the system's roots.
    pub ca_file: Option<String>,
    /// `redis_tls_cert_file`, when the node presents a client certificate (mutual TLS).
    pub cert_file: Option<String>,
    /// `redis_tls_key_file`, with `cert_file`.
    pub key_file: Option<String>,
    /// Roots in the system's store (when no CA file replaces them).
    pub system_roots: usize,
    /// The PEM bytes, as the crate takes them for every client it builds.
    certs: TlsCertificates,
    /// The same trust and identity as one rustls config, for [`RedisTls::handshake`].
    rustls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Install ring as the process's rustls provider (the crate builds its configs with the
/// default one and names none itself). A provider installed before (by us or anyone) stays.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn read_pem(key: &'static str, path: &str) -> Result<Vec<u8>, KeyError> {
    let meta = std::fs::metadata(path).map_err(|e| (key, format!("cannot read {path}: {e}")))?;
    if meta.len() > PEM_FILE_BYTES_MAX {
        return Err((
            key,
            format!(
                "{path} is {} bytes, more than the {PEM_FILE_BYTES_MAX} a PEM file may have",
                meta.len()
            ),
        ));
    }
    std::fs::read(path).map_err(|e| (key, format!("cannot read {path}: {e}")))
}

pub(crate) fn pem_certs(
    key: &'static str,
    path: &str,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (key, format!("{path}: not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err((
            key,
            format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ));
    }
    Ok(certs)
}

impl RedisTls {
    /// The TLS of `cfg`'s `redis_url`: None when it is not `rediss://`. Reads the files and
    /// the system's trust store, and builds one rustls config to check that they suit
    /// (a key that is not the certificate's is refused here, not at every connect).
    pub fn from_config(cfg: &Config) -> Result<Option<RedisTls>, KeyError> {
        let Some(url) = cfg.redis_url.as_deref() else {
            return Ok(None);
        };
        let urls = crate::cluster::parse_redis_urls(url, cfg.redis_cluster)
            .map_err(|e| ("redis_url", e))?;
        let verify = crate::cluster::url_tls(&urls);
        if verify == UrlTls::Plain {
            return Ok(None);
        }
        install_crypto_provider();
        // The crate reads the system's store on every connect, CA file or not, and fails the
        // connect on any error in it: find that now.
        let system = rustls_native_certs::load_native_certs();
        if let Some(e) = system.errors.first() {
            return Err((
                "redis_url",
                format!(
                    "rediss:// needs the system's trust store readable (the redis client reads it on every connect, even with redis_tls_ca_file): {e}; fix or remove the bad entry (SSL_CERT_FILE, SSL_CERT_DIR, /etc/ssl/certs)"
                ),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        let root_pem = match cfg.redis_tls_ca_file.as_deref() {
            Some(path) => {
                let pem = read_pem("redis_tls_ca_file", path)?;
                for c in pem_certs("redis_tls_ca_file", path, &pem)? {
                    roots.add(c).map_err(|e| {
                        (
                            "redis_tls_ca_file",
                            format!("{path}: not a usable CA certificate: {e}"),
                        )
                    })?;
                }
                Some(pem)
            }
            None => {
                let (added, _) = roots.add_parsable_certificates(system.certs);
                if added == 0 && verify == UrlTls::Verified {
                    return Err((
                        "redis_tls_ca_file",
                        "is empty and the system's trust store holds no root (install ca-certificates), so no Redis certificate could be verified: set redis_tls_ca_file to the CA that signed Redis's certificate".into(),
                    ));
                }
                None
            }
        };
        let system_roots = if root_pem.is_none() { roots.len() } else { 0 };
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots.clone());
        let (client_tls, mut config) =
            match (
                cfg.redis_tls_cert_file.as_deref(),
                cfg.redis_tls_key_file.as_deref(),
            ) {
                (Some(cert_path), Some(key_path)) => {
                    let cert = read_pem("redis_tls_cert_file", cert_path)?;
                    let key = read_pem("redis_tls_key_file", key_path)?;
                    let chain = pem_certs("redis_tls_cert_file", cert_path, &cert)?;
                    let der = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                        (
                            "redis_tls_key_file",
                            format!(
                                "{key_path}: not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"
                            ),
                        )
                    })?;
                    let config = builder.with_client_auth_cert(chain, der).map_err(|e| {
                        (
                            "redis_tls_key_file",
                            format!("{key_path} does not suit {cert_path}: {e}"),
                        )
                    })?;
                    (
                        Some(ClientTlsConfig {
                            client_cert: cert,
                            client_key: key,
                        }),
                        config,
                    )
                }
                (None, None) => (None, builder.with_no_client_auth()),
                (Some(_), None) => return Err((
                    "redis_tls_key_file",
                    "is empty while redis_tls_cert_file is set: a client certificate needs its key"
                        .into(),
                )),
                (None, Some(_)) => return Err((
                    "redis_tls_cert_file",
                    "is empty while redis_tls_key_file is set: a client key needs its certificate"
                        .into(),
                )),
            };
        if verify == UrlTls::Insecure {
            // As the crate does for #insecure: no name, no certificate check.
            config.enable_sni = false;
            let supported = rustls::crypto::CryptoProvider::get_default()
                .map(|p| p.signature_verification_algorithms)
                .unwrap_or(
                    rustls::crypto::ring::default_provider().signature_verification_algorithms,
                );
            config
                .dangerous()
                .set_certificate_verifier(Arc::new(AcceptAnyServer { supported }));
        }
        Ok(Some(RedisTls {
            verify,
            ca_file: cfg.redis_tls_ca_file.clone(),
            cert_file: cfg.redis_tls_cert_file.clone(),
            key_file: cfg.redis_tls_key_file.clone(),
            system_roots,
            certs: TlsCertificates {
                client_tls,
                root_cert: root_pem,
            },
            rustls: Arc::new(config),
        }))
    }

    /// The certificates for the cluster client's builder (it reaches every master with them).
    pub fn certs(&self) -> TlsCertificates {
        self.certs.clone()
    }

    /// One line for logs and the doctor (no secret: file names only).
    pub fn describe(&self) -> String {
        let server = match (self.verify, &self.ca_file) {
            (UrlTls::Insecure, _) => {
                "the server's certificate is NOT checked (#insecure)".to_owned()
            }
            (_, Some(ca)) => format!("the server's certificate checked against {ca}"),
            (_, None) => format!(
                "the server's certificate checked against the system's {} roots",
                self.system_roots
            ),
        };
        match &self.cert_file {
            Some(c) => format!("{server}; client certificate {c}"),
            None => format!("{server}; no client certificate"),
        }
    }

    /// A TLS handshake of our own with `host:port` (the doctor's check), with the trust and
    /// identity the bridge's clients use, then one PING over it: a server that wants a client
    /// certificate it did not get says so only after the client finished its handshake (TLS
    /// 1.3). Returns the protocol and cipher suite; every step bounded by `timeout`.
    pub fn handshake(&self, host: &str, port: u16, timeout: Duration) -> Result<String, String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} resolves to no address"))?;
        let mut tcp = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
        tcp.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host} is not a name a certificate can carry: {e}"))?;
        let mut tls = rustls::ClientConnection::new(self.rustls.clone(), name)
            .map_err(|e| format!("TLS setup: {e}"))?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        let what = format!(
            "{:?} {:?}",
            tls.protocol_version()
                .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            tls.negotiated_cipher_suite()
                .map(|s| s.suite())
                .map_or(rustls::CipherSuite::Unknown(0), |s| s)
        );
        let mut s = rustls::Stream::new(&mut tls, &mut tcp);
        s.write_all(b"*1\r\n$4\r\nPING\r\n")
            .map_err(|e| format!("after the TLS handshake ({what}): {e}"))?;
        let mut buf = [0u8; PING_REPLY_BYTES_MAX];
        let n = s.read(&mut buf).map_err(|e| {
            format!("after the TLS handshake ({what}), the server closed the session: {e}")
        })?;
        // +PONG, or -NOAUTH from a Redis with a password: either way TLS carried a reply.
        if n == 0 || !matches!(buf[0], b'+' | b'-') {
            return Err(format!(
                "after the TLS handshake ({what}), PING got no Redis reply"
            ));
        }
        Ok(what)
    }
}

/// The connection info of `url` with the certificates of `tls` when it is `rediss://`.
pub fn connection_info(url: &str, tls: Option<&RedisTls>) -> RedisResult<ConnectionInfo> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    match (tls, info.addr()) {
        (Some(t), ConnectionAddr::TcpTls { .. }) => {
            Ok(redis::Client::build_with_tls(info, t.certs.clone())?
                .get_connection_info()
                .clone())
        }
        _ => Ok(info),
    }
}

/// `info` (credentials, database, TLS and its certificates) at another address: a Redis
/// Cluster master the slot map names.
pub fn at_addr(info: &ConnectionInfo, host: String, port: u16) -> ConnectionInfo {
    let addr = match info.addr().clone() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure,
            tls_params,
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    info.clone().set_addr(addr)
}

/// The host of a TCP or TLS address (for `CLUSTER SLOTS` answers naming no host).
pub fn host_of(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(h, _) | ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
        other => other.to_string(),
    }
}

/// `#insecure` in the doctor's own handshake: any certificate, any name, as the crate does;
/// the handshake's signatures are still checked (it proves the server holds the key of the
/// certificate it sent, whichever that is).
#[derive(Debug)]
struct AcceptAnyServer {
    supported: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.supported)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.supported)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.supported.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> Config {
        Config {
            redis_url: Some(url.into()),
            ..Config::default()
        }
    }

    #[test]
    fn plain_or_no_redis_has_no_tls() {
        assert!(RedisTls::from_config(&Config::default()).unwrap().is_none());
        assert!(RedisTls::from_config(&cfg("redis://h:1"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn unreadable_or_empty_files_are_refused_by_their_key() {
        let dir = std::env::temp_dir().join(format!("sb-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let junk = junk.to_str().unwrap().to_owned();

        let mut c = cfg("rediss://h:6380");
        c.redis_tls_ca_file = Some("/nonexistent/ca.pem".into());
        let (key, e) = RedisTls::from_config(&c).unwrap_err();
        assert_eq!(key, "redis_tls_ca_file");
        assert!(e.contains("cannot read /nonexistent/ca.pem"), "{e}");

        c.redis_tls_ca_file = Some(junk.clone());
        let (key, e) = RedisTls::from_config(&c).unwrap_err();
        assert_eq!(key, "redis_tls_ca_file");
        assert!(e.contains("no PEM certificate"), "{e}");

        let mut c = cfg("rediss://h:6380#insecure");
        c.redis_tls_cert_file = Some(junk.clone());
        c.redis_tls_key_file = Some(junk.clone());
        let (key, e) = RedisTls::from_config(&c).unwrap_err();
        assert_eq!(key, "redis_tls_cert_file");
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_master_keeps_the_seeds_tls_and_credentials() {
        let seed =
            redis::IntoConnectionInfo::into_connection_info("rediss://:pw@seed:7000#insecure")
                .unwrap();
        let m = at_addr(&seed, "10.0.0.9".into(), 7001);
        match m.addr() {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => assert_eq!((host.as_str(), *port, *insecure), ("10.0.0.9", 7001, true)),
            other => panic!("{other:?}"),
        }
        assert_eq!(m.redis_settings().password(), Some("pw"));
        assert_eq!(host_of(m.addr()), "10.0.0.9");
        let plain = redis::IntoConnectionInfo::into_connection_info("redis://seed:7000").unwrap();
        assert!(
            matches!(at_addr(&plain, "h".into(), 1).addr(), ConnectionAddr::Tcp(h, 1) if h == "h")
        );
    }
}
