//! TLS for client connections: the server settings read from PEM files (and re-read on SIGHUP), and the
//! per-connection layer that turns ciphertext into plaintext and back, on rustls (ring provider) without
//! touching a socket.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig, ServerConnection};

/// What an operator names on the command line (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then the chain.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) private key.
    pub key: PathBuf,
    /// PEM: the CAs that sign client certificates. When given, every TLS client must present a
    /// certificate one of them signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Why TLS settings could not be loaded. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {error}", file.display())]
    Read { file: PathBuf, error: io::Error },
    #[error("{}: no PEM certificate in it", file.display())]
    NoCertificate { file: PathBuf },
    #[error("{}: not a PEM certificate file: {reason}", file.display())]
    BadCertificate { file: PathBuf, reason: String },
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {reason}", file.display())]
    BadKey { file: PathBuf, reason: String },
    #[error("{}: not usable as client CAs: {reason}", file.display())]
    BadClientCa { file: PathBuf, reason: String },
    #[error("{} and {}: {reason}", cert.display(), key.display())]
    Mismatch { cert: PathBuf, key: PathBuf, reason: String },
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|error| TlsError::Read { file: file.to_path_buf(), error })
}

fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate { file: file.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { file: file.to_path_buf() });
    }
    Ok(certs)
}

/// ring, as the project requires (aws-lc-rs, rustls' default, is the slowest part of a clean build). Its
/// provider has no post-quantum key exchange, which is why rustls 0.23.48 marks it deprecated.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server settings read from the files. Checks everything a handshake will need: the chain parses,
/// the key parses and belongs to the certificate, the client CAs parse.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey { file: files.key.clone(), reason: e.to_string() })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let bad = |reason: String| TlsError::BadClientCa { file: ca.clone(), reason };
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca)? {
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(config))
}

/// Resumable TLS sessions each shard remembers.
const SESSION_CACHE_PER_SHARD: usize = 4096;

/// The node's current TLS settings, replaced on SIGHUP. Shards check [`TlsSlot::generation`] (one atomic
/// load) when a TLS connection arrives and take the lock only after a reload.
#[derive(Debug)]
pub struct TlsSlot {
    generation: AtomicU64,
    current: Mutex<Arc<ServerConfig>>,
}

impl TlsSlot {
    pub fn new(config: Arc<ServerConfig>) -> TlsSlot {
        TlsSlot { generation: AtomicU64::new(0), current: Mutex::new(config) }
    }

    /// Installs new settings: connections accepted from now on use them; established ones keep theirs.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = config;
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One shard's view of the node's TLS settings: a copy with its own session cache, so that resuming
/// sessions never takes a lock another shard contends for (a client resumes on the shard that
/// accepted it before; on another it does a full handshake).
#[derive(Debug)]
pub(crate) struct ShardTls {
    slot: Arc<TlsSlot>,
    generation: u64,
    config: Arc<ServerConfig>,
}

impl ShardTls {
    pub(crate) fn new(slot: Arc<TlsSlot>) -> ShardTls {
        let generation = slot.generation();
        let config = Self::own_copy(&slot.current());
        ShardTls { slot, generation, config }
    }

    fn own_copy(base: &ServerConfig) -> Arc<ServerConfig> {
        let mut c = base.clone();
        c.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_PER_SHARD);
        Arc::new(c)
    }

    /// The settings for a connection accepted now.
    pub(crate) fn config(&mut self) -> Arc<ServerConfig> {
        let generation = self.slot.generation();
        if generation != self.generation {
            self.generation = generation;
            self.config = Self::own_copy(&self.slot.current());
        }
        self.config.clone()
    }
}

/// The connection's TLS failed (bad handshake, bad record, a peer's alert): what to log.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsFailure(pub String);

/// The TLS state of one connection.
#[derive(Debug)]
pub(crate) struct TlsLayer {
    conn: ServerConnection,
}

impl TlsLayer {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<TlsLayer, TlsFailure> {
        let mut conn = ServerConnection::new(config).map_err(|e| TlsFailure(e.to_string()))?;
        // Output is drained right after every write (`encrypt`), so rustls need not limit it; with a
        // limit, a large fan-out batch would be cut short.
        conn.set_buffer_limit(None);
        Ok(TlsLayer { conn })
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Feeds ciphertext; appends the plaintext it carried to `plain`. On failure, the alert that tells
    /// the peer why is ready in [`TlsLayer::take_output`].
    pub(crate) fn decrypt(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsFailure> {
        while !data.is_empty() {
            match self.conn.read_tls(&mut data) {
                // rustls always has room for more unless its buffer limit was hit (an error): a read
                // that takes nothing would loop forever, so it ends the connection instead.
                Ok(0) => return Err(TlsFailure("TLS: no room for more input".into())),
                Ok(_) => {}
                Err(e) => return Err(TlsFailure(e.to_string())),
            }
            self.conn.process_new_packets().map_err(|e| TlsFailure(e.to_string()))?;
            read_plaintext(&mut self.conn, plain);
        }
        Ok(())
    }

    /// Encrypts `plain` (sent once the handshake is done; buffered until then) and appends what is
    /// ready to go out to `out`.
    pub(crate) fn encrypt(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        if !plain.is_empty() {
            self.buffer(plain);
        }
        self.take_output(out);
    }

    /// Encrypts `plain` (once the handshake is done) and keeps the records for the next
    /// [`TlsLayer::take_output`].
    pub(crate) fn buffer(&mut self, plain: &[u8]) {
        // Cannot fail: no buffer limit (see `new`), and the writer only buffers.
        let _ = self.conn.writer().write_all(plain);
    }

    /// Appends the TLS bytes rustls has ready (handshake messages, records, alerts) to `out`.
    pub(crate) fn take_output(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            // Writing into a Vec does not fail.
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
    }

    pub(crate) fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Queues a close_notify alert (taken with the next output).
    pub(crate) fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// The subject CN of the client's certificate, if it presented one that has a CN.
    pub(crate) fn peer_common_name(&self) -> Option<String> {
        let cert = self.conn.peer_certificates()?.first()?;
        common_name(cert.as_ref())
    }

    pub(crate) fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }
}

fn read_plaintext(conn: &mut ServerConnection, plain: &mut Vec<u8>) {
    let mut chunk = [0u8; 8192];
    loop {
        match conn.reader().read(&mut chunk) {
            // 0: the peer sent close_notify; its TCP close follows.
            Ok(0) => return,
            Ok(n) => plain.extend_from_slice(&chunk[..n]),
            // WouldBlock: nothing more until more ciphertext arrives.
            Err(_) => return,
        }
    }
}

/// The first subject CN of a DER certificate (already verified by the handshake), as UTF-8.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::{Decode, Tag, Tagged};
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    const CN: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3");
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid != CN {
                continue;
            }
            let value = &atv.value;
            return match value.tag() {
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
                    String::from_utf8(value.value().to_vec()).ok()
                }
                _ => None,
            };
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/certs")
    }

    fn files(client_ca: bool) -> TlsFiles {
        let d = certs();
        TlsFiles {
            cert: d.join("server.pem"),
            key: d.join("server.key"),
            client_ca: client_ca.then(|| d.join("ca.pem")),
        }
    }

    #[test]
    fn loads_the_test_certificates() {
        load(&files(false)).unwrap();
        load(&files(true)).unwrap();
    }

    #[test]
    fn errors_name_the_file_at_fault() {
        let d = certs();
        let mut f = files(false);
        f.cert = d.join("missing.pem");
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");

        let mut f = files(false);
        f.cert = d.join("server.key"); // a key, not a certificate
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("server.key") && e.contains("no PEM certificate"), "{e}");

        let mut f = files(false);
        f.key = d.join("server.pem"); // a certificate, not a key
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("server.pem") && e.contains("private key"), "{e}");

        let mut f = files(false);
        f.key = d.join("client.key"); // a key of another certificate
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("server.pem") && e.contains("client.key"), "{e}");

        let mut f = files(true);
        f.client_ca = Some(d.join("server.key"));
        let e = load(&f).unwrap_err().to_string();
        assert!(e.contains("server.key"), "{e}");
    }

    #[test]
    fn common_name_of_the_client_certificate() {
        let pem = std::fs::read(certs().join("client.pem")).unwrap();
        let der = CertificateDer::from_pem_slice(&pem).unwrap();
        assert_eq!(common_name(der.as_ref()).as_deref(), Some("alice"));
        assert_eq!(common_name(b"not a certificate"), None);
    }

    #[test]
    fn a_shard_takes_reloaded_settings_for_new_connections() {
        let slot = Arc::new(TlsSlot::new(load(&files(false)).unwrap()));
        let mut shard = ShardTls::new(slot.clone());
        let before = shard.config();
        assert!(Arc::ptr_eq(&before, &shard.config()), "no reload: the same settings");
        slot.replace(load(&files(true)).unwrap());
        let after = shard.config();
        assert!(!Arc::ptr_eq(&before, &after));
    }
}
