//! Test certificates: a CA and server/client certificates signed by it, written as PEM
//! files the way an operator would hand them to `--tlscacert/--tlscert/--tlskey`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA (certificate and key) kept in memory so it can sign more certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// The three files of one TLS identity.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The CA bundle that verifies the peer.
    pub ca: PathBuf,
    /// This side's certificate.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issue(
        &self,
        cn: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> anyhow::Result<(String, String)> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `<name>-ca.pem`, `<name>-cert.pem` and `<name>-key.pem` into `dir` for a server
    /// valid for `sans` (DNS names or IP addresses).
    pub fn server(&self, dir: &Path, name: &str, sans: &[&str]) -> anyhow::Result<Identity> {
        let (cert, key) = self.issue(name, sans, ExtendedKeyUsagePurpose::ServerAuth)?;
        self.write(dir, name, &cert, &key)
    }

    /// Writes the files of a client identity named `name` into `dir`.
    pub fn client(&self, dir: &Path, name: &str) -> anyhow::Result<Identity> {
        let (cert, key) = self.issue(name, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        self.write(dir, name, &cert, &key)
    }

    fn write(&self, dir: &Path, name: &str, cert: &str, key: &str) -> anyhow::Result<Identity> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let id = Identity {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-cert.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        // Each file is replaced by a rename, as a mounted Secret update does.
        for (path, data) in [
            (&id.ca, self.cert_pem.as_str()),
            (&id.cert, cert),
            (&id.key, key),
        ] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path)
                .with_context(|| format!("renaming to {}", path.display()))?;
        }
        Ok(id)
    }
}
