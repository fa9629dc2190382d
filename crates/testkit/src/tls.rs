//! A test certificate authority: a fresh CA, a server certificate it signed
//! for 127.0.0.1 and localhost, and the CA's PEM in a file that a client
//! (tollgate's `ca_file`, curl's `--cacert`, Python's `verify=`) trusts.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate, PEM.
    pub pem: String,
    /// `pem`, written to a file of its own (removed on drop).
    pub path: PathBuf,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
    server_cert_pem: String,
    server_key_pem: String,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            // Each CA its own name: a client trusting two finds the right one.
            .push(
                DnType::CommonName,
                format!("tollgate test CA {}", crate::unique_prefix("ca")),
            );
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = ca_params.self_signed(&ca_key).expect("ca cert");
        let server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("server params");
        let server_key = KeyPair::generate().expect("server key");
        let server = server_params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server cert");
        let pem = ca.pem();
        let path = std::env::temp_dir().join(format!(
            "tollgate-test-ca-{}-{}.pem",
            std::process::id(),
            crate::unique_prefix("ca")
        ));
        std::fs::write(&path, &pem).expect("write the CA file");
        TestCa {
            pem,
            path,
            server_cert: server.der().clone(),
            server_key: server_key.serialize_der(),
            server_cert_pem: server.pem(),
            server_key_pem: server_key.serialize_pem(),
        }
    }

    /// The server certificate and its key as PEM files `NAME.crt` and
    /// `NAME.key` in `dir` (replaced atomically if they exist, as a
    /// certificate renewal would): their paths.
    pub fn write_server_files(&self, dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
        let write = |file: String, text: &str| {
            let path = dir.join(file);
            let temp = path.with_extension("tmp");
            std::fs::write(&temp, text).expect("write a PEM file");
            std::fs::rename(&temp, &path).expect("move the PEM file in place");
            path
        };
        (
            write(format!("{name}.crt"), &self.server_cert_pem),
            write(format!("{name}.key"), &self.server_key_pem),
        )
    }

    /// A TLS acceptor presenting the server certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
