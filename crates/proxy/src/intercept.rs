//! `HTTPS_PROXY` with interception, opt-in per upstream (`intercept =
//! true`): a CONNECT to that upstream's host is answered with a certificate
//! minted for the host by a local CA (`tollgate proxy ca init`), so each
//! request inside the tunnel is seen, paced and retried like any other.
//! Clients trust the local CA's certificate (`ca.pem`); its key never
//! leaves `ca-key.pem` (mode 0600).

use parking_lot::Mutex;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The local CA's certificate and key, in its directory.
pub const CERT_FILE: &str = "ca.pem";
pub const KEY_FILE: &str = "ca-key.pem";
/// The CA's name: the same every time it is rebuilt from its key, so the
/// certificates it mints chain to `ca.pem`.
const CA_NAME: &str = "tollgate local proxy CA";
/// Hosts whose minted configs are kept (one per intercepted upstream in
/// practice); past it the cache starts again.
const MAX_CACHED: usize = 1024;

/// Create a local CA in `dir`: `ca.pem` (to give clients) and `ca-key.pem`
/// (0600). Refuses to replace an existing one unless `force`.
pub fn init(dir: &Path, force: bool) -> Result<PathBuf, String> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(format!(
            "{} already holds a CA; clients that trust it would stop trusting a new one (give --force to replace it)",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let cert = ca_params()
        .self_signed(&key)
        .map_err(|e| format!("cannot make the CA certificate: {e}"))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem())
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    Ok(cert_path)
}

/// The key file, readable by its owner only (it can mint a certificate for
/// any host the clients trust it for).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // (the mode above applies only to a new file: a replaced one is set too)
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    }
    file.write_all(bytes)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A loaded local CA, minting (and keeping) a certificate per host.
pub struct LocalCa {
    issuer: rcgen::Certificate,
    key: KeyPair,
    minted: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// The CA `init` wrote in `dir`.
    pub fn load(dir: &Path) -> Result<LocalCa, String> {
        let key_path = dir.join(KEY_FILE);
        let pem = std::fs::read_to_string(&key_path).map_err(|e| {
            format!(
                "cannot read the proxy's CA key {} ({e}); create the CA with `tollgate proxy ca init`",
                key_path.display()
            )
        })?;
        let key = KeyPair::from_pem(&pem)
            .map_err(|e| format!("{} is not a PEM key: {e}", key_path.display()))?;
        let issuer = ca_params()
            .self_signed(&key)
            .map_err(|e| format!("cannot rebuild the CA from {}: {e}", key_path.display()))?;
        Ok(LocalCa {
            issuer,
            key,
            minted: Mutex::default(),
        })
    }

    /// A TLS server config presenting a certificate for `host` (a name or
    /// an IP address), minted once.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, String> {
        if let Some(config) = self.minted.lock().get(host) {
            return Ok(config.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_string()])
            .map_err(|e| format!("cannot make a certificate for {host}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, host);
        let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| format!("cannot sign a certificate for {host}: {e}"))?;
        let chain = vec![
            cert.der().clone(),
            CertificateDer::from(self.issuer.der().to_vec()),
        ];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| format!("TLS: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let mut minted = self.minted.lock();
        if minted.len() >= MAX_CACHED {
            minted.clear();
        }
        minted.insert(host.to_string(), config.clone());
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_ca_whose_key_only_its_owner_reads_and_mints_per_host() {
        let dir = std::env::temp_dir().join(format!("tollgate-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cert = init(&dir, false).unwrap();
        assert!(std::fs::read_to_string(cert)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(init(&dir, false)
            .unwrap_err()
            .contains("already holds a CA"));
        let ca = LocalCa::load(&dir).unwrap();
        let a = ca.server_config("api.example.com").unwrap();
        let b = ca.server_config("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "minted once per host");
        assert!(ca.server_config("127.0.0.1").is_ok());
        assert!(LocalCa::load(&dir.join("none"))
            .unwrap_err()
            .contains("tollgate proxy ca init"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
