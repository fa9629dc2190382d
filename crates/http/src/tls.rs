//! TLS for a listener: a certificate chain and its key (PEM files) served by
//! rustls, offering HTTP/2 and HTTP/1.1 by ALPN. The files are read again
//! when they change (or on `reload`, which SIGHUP calls) without dropping a
//! connection: each handshake takes the certificate current at that moment,
//! and a pair that does not load leaves the current one in place.

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Where a listener's certificate chain and private key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate a listener presents, reloadable.
#[derive(Debug)]
pub struct Certificates {
    files: Mutex<CertFiles>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' modification times when last loaded.
    loaded_at: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertFiles {
    /// The same files, relative paths taken from `dir`.
    pub fn under(&self, dir: &Path) -> CertFiles {
        CertFiles {
            cert: dir.join(&self.cert),
            key: dir.join(&self.key),
        }
    }
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The chain and the key as the files hold them, each file read once.
fn read_pair(files: &CertFiles) -> Result<Pair, String> {
    let cert = files.cert.display();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("tls cert {cert}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls cert {cert}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("tls cert {cert}: no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "tls key {}: {e} (a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            files.key.display()
        )
    })?;
    Ok((chain, key))
}

/// Read and check a pair; errors name the file and what is wrong with it.
pub fn load(files: &CertFiles) -> Result<CertifiedKey, String> {
    let (chain, key) = read_pair(files)?;
    let key_path = files.key.display();
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls key {key_path}: {e}"))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(|e| {
        format!(
            "tls key {key_path} does not belong to the certificate in {}: {e}",
            files.cert.display()
        )
    })?;
    Ok(pair)
}

/// The certificates (PEM) in a CA file; errors name the file.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let named = |what: String| format!("ca_file {}: {what}", path.display());
    let pem = std::fs::read(path).map_err(|e| named(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| named(format!("not a PEM certificate ({e})")))?;
    if certs.is_empty() {
        return Err(named("holds no PEM certificate".into()));
    }
    Ok(certs)
}

impl Certificates {
    /// Load `files` now (an error names the file).
    pub fn load(files: CertFiles) -> Result<Arc<Certificates>, String> {
        let pair = load(&files)?;
        let stamps = (modified(&files.cert), modified(&files.key));
        Ok(Arc::new(Certificates {
            files: Mutex::new(files),
            current: RwLock::new(Arc::new(pair)),
            loaded_at: Mutex::new(stamps),
        }))
    }

    /// Read the files again (perhaps new ones); on error the current pair
    /// stays and the error says why.
    pub fn reload(&self, files: Option<CertFiles>) -> Result<(), String> {
        if let Some(files) = files {
            *self.files.lock() = files;
        }
        let files = self.files.lock().clone();
        let stamps = (modified(&files.cert), modified(&files.key));
        let pair = load(&files)?;
        *self.current.write() = Arc::new(pair);
        *self.loaded_at.lock() = stamps;
        Ok(())
    }

    /// `reload` if either file changed since it was loaded; None if neither did.
    pub fn reload_if_changed(&self) -> Option<Result<(), String>> {
        let files = self.files.lock().clone();
        let stamps = (modified(&files.cert), modified(&files.key));
        if *self.loaded_at.lock() == stamps {
            return None;
        }
        Some(self.reload(None))
    }

    /// A TLS acceptor presenting the current certificate at each handshake,
    /// offering HTTP/2 first, then HTTP/1.1.
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// A client's TLS config for `https` upstreams: the system's roots plus the
/// certificates in `ca_file` (PEM), and a client certificate when the
/// upstream asks for one. Errors name the file and what is wrong with it.
pub fn client_config(
    ca_file: Option<&Path>,
    client_cert: Option<&CertFiles>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        for cert in read_ca_file(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    match client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some(files) => {
            let (chain, key) = read_pair(files)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate {}: {e}", files.cert.display()))
        }
    }
}

/// HTTP, or TLS with `tls`, to any host; no Nagle (a request written in
/// pieces must not wait for an ACK). Upstream clients and receivers'
/// clients alike are built on it.
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: std::time::Duration,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    tls_over(&tls, tcp_connector(connect_timeout))
}

/// TCP to any host and port, no Nagle, giving up after `connect_timeout`.
pub(crate) fn tcp_connector(
    connect_timeout: std::time::Duration,
) -> hyper_util::client::legacy::connect::HttpConnector {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

/// TLS with `tls` for `https` URIs (plain for `http`), over what `inner` connects.
pub(crate) fn tls_over<C>(tls: &rustls::ClientConfig, inner: C) -> hyper_rustls::HttpsConnector<C> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(inner)
}
