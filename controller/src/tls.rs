//! Certificates for a pool's mTLS: a CA, the server certificate of workers and gateway (SANs
//! for the gateway Service and every worker's stable name), client certificates (gateway →
//! worker, controller, users), the Secrets holding them, and the rotation decision.
//!
//! Uses rcgen on ring to issue and x509-parser to read back; no client calls.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// Key of the CA certificate in every TLS Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Key of the CA's private key, only in the CA Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// Key of the previous CA certificate, only in the CA Secret during a rollover.
pub const PREVIOUS_CA_KEY: &str = "previous-ca.crt";
/// Key of the certificate.
pub const CERT_KEY: &str = "tls.crt";
/// Key of the private key.
pub const KEY_KEY: &str = "tls.key";

/// The CA outlives the certificates it signs by this factor, so leaves rotate many times per CA.
const CA_LIFETIME_FACTOR: u32 = 4;
/// Certificates are valid from a little before issue, for clocks that lag.
pub const BACKDATE: Duration = Duration::from_secs(300);
/// After a new CA is issued, certificates signed by the previous one are kept this long, while
/// the kubelet delivers the two-CA `ca.crt` to every pod.
pub const CA_SWITCH_GRACE: Duration = Duration::from_secs(600);

/// Failures issuing or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen refused to issue.
    #[error("cannot issue the {what} certificate")]
    Issue {
        /// Which certificate.
        what: String,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// A PEM or DER certificate or key did not parse.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was parsed, e.g. `tls.crt of secret builds/pool-server-tls`.
        what: String,
        /// Why.
        reason: String,
    },
    /// A lifetime is out of range.
    #[error("invalid certificate lifetime {0:?}")]
    Lifetime(Duration),
}

type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A CA certificate and its key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ca {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A certificate issued by a [`Ca`], with its key and the CA certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// Which purpose a leaf certificate serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// Workers and gateway serving TLS; also usable as a client (the gateway dials workers).
    Server,
    /// A client only.
    Client,
}

// === names ===

/// Every DNS name and IP the server certificate must carry for `replicas` workers: the
/// gateway Service in all its forms, each worker's stable name, and loopback.
pub fn server_names(pool: &str, namespace: &str, replicas: i32) -> Vec<String> {
    let gw = crate::render::gateway_name(pool);
    let headless = crate::render::workers_service_name(pool);
    let sts = crate::render::worker_statefulset_name(pool);
    let mut names = vec![
        gw.clone(),
        format!("{gw}.{namespace}"),
        format!("{gw}.{namespace}.svc"),
        format!("{gw}.{namespace}.svc.cluster.local"),
        format!("{headless}.{namespace}.svc"),
        format!("{headless}.{namespace}.svc.cluster.local"),
    ];
    for i in 0..replicas.max(0) {
        names.push(format!("{sts}-{i}.{headless}.{namespace}.svc"));
        names.push(format!(
            "{sts}-{i}.{headless}.{namespace}.svc.cluster.local"
        ));
    }
    names.push("localhost".to_string());
    names.push("127.0.0.1".to_string());
    names
}

// === issuing ===

/// Issues a self-signed CA valid for `CA_LIFETIME_FACTOR` × `lifetime` from `now`.
pub fn issue_ca(pool: &str, now: OffsetDateTime, lifetime: Duration) -> Result<Ca> {
    let ca_lifetime = lifetime
        .checked_mul(CA_LIFETIME_FACTOR)
        .ok_or(TlsError::Lifetime(lifetime))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("kiln {pool} CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kiln");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now, ca_lifetime)?;
    let key = KeyPair::generate().map_err(|source| issue_err("CA", source))?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| issue_err("CA", source))?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a leaf certificate signed by `ca`. `names` become DNS or IP SANs; the first one
/// (or `common_name`) is the subject CN.
pub fn issue(
    ca: &Ca,
    common_name: &str,
    names: &[String],
    usage: Usage,
    now: OffsetDateTime,
    lifetime: Duration,
) -> Result<Issued> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| TlsError::Parse {
        what: "CA key".to_string(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|e| TlsError::Parse {
        what: "CA certificate".to_string(),
        reason: e.to_string(),
    })?;
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(|source| issue_err(common_name, source))?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name.to_string());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "kiln");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = match usage {
        Usage::Server => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, lifetime)?;
    let key = KeyPair::generate().map_err(|source| issue_err(common_name, source))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| issue_err(common_name, source))?;
    Ok(Issued {
        ca_pem: ca.cert_pem.clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn set_validity(params: &mut CertificateParams, now: OffsetDateTime, life: Duration) -> Result<()> {
    let life_t = time::Duration::try_from(life).map_err(|_| TlsError::Lifetime(life))?;
    if life.is_zero() {
        return Err(TlsError::Lifetime(life));
    }
    params.not_before = now - time::Duration::try_from(BACKDATE).unwrap_or(time::Duration::ZERO);
    params.not_after = now.checked_add(life_t).ok_or(TlsError::Lifetime(life))?;
    Ok(())
}

fn issue_err(what: &str, source: rcgen::Error) -> TlsError {
    TlsError::Issue {
        what: what.to_string(),
        source,
    }
}

// === secrets ===

/// A `kubernetes.io/tls` Secret with `ca.crt`, `tls.crt` and `tls.key`.
pub fn tls_secret(metadata: ObjectMeta, issued: &Issued) -> Secret {
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".to_string()),
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.to_string(), bytes(&issued.ca_pem)),
            (CERT_KEY.to_string(), bytes(&issued.cert_pem)),
            (KEY_KEY.to_string(), bytes(&issued.key_pem)),
        ])),
        ..Secret::default()
    }
}

/// Adds buildctl's `--tlsdir` names (`ca.pem`, `cert.pem`, `key.pem`) beside the standard
/// keys, so the Secret mounted as a directory works with `kiln build --tlsdir` and `buildctl`.
pub fn with_tlsdir_names(mut secret: Secret) -> Secret {
    if let Some(data) = secret.data.as_mut() {
        for (from, to) in [
            (CA_CERT_KEY, "ca.pem"),
            (CERT_KEY, "cert.pem"),
            (KEY_KEY, "key.pem"),
        ] {
            if let Some(v) = data.get(from).cloned() {
                data.insert(to.to_string(), v);
            }
        }
    }
    secret
}

/// An `Opaque` Secret with the CA certificate and key (`ca.crt`, `ca.key`) and, after a
/// rollover, the previous CA certificate (`previous-ca.crt`).
pub fn ca_secret(metadata: ObjectMeta, ca: &Ca, previous: Option<&str>) -> Secret {
    let mut data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), bytes(&ca.cert_pem)),
        (CA_KEY_KEY.to_string(), bytes(&ca.key_pem)),
    ]);
    if let Some(p) = previous {
        data.insert(PREVIOUS_CA_KEY.to_string(), bytes(p));
    }
    Secret {
        metadata,
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

/// The text under `key` of a Secret, if present and UTF-8.
pub fn secret_text<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .data
        .as_ref()?
        .get(key)
        .and_then(|b| std::str::from_utf8(&b.0).ok())
}

/// A client identity as PEM text: the CA bundle that verifies the server, the certificate
/// and its key.
#[derive(Clone, Debug)]
pub struct IdentityPems {
    /// `ca.crt`.
    pub ca: String,
    /// `tls.crt`.
    pub cert: String,
    /// `tls.key`.
    pub key: String,
}

/// Reads `ca.crt`, `tls.crt` and `tls.key` from `secret`; the error is the first key missing.
pub fn identity_pems(secret: &Secret) -> std::result::Result<IdentityPems, &'static str> {
    let text = |k: &'static str| secret_text(secret, k).map(str::to_string).ok_or(k);
    Ok(IdentityPems {
        ca: text(CA_CERT_KEY)?,
        cert: text(CERT_KEY)?,
        key: text(KEY_KEY)?,
    })
}

/// Reads the CA back from its Secret.
pub fn ca_from_secret(secret: &Secret) -> Option<Ca> {
    Some(Ca {
        cert_pem: secret_text(secret, CA_CERT_KEY)?.to_string(),
        key_pem: secret_text(secret, CA_KEY_KEY)?.to_string(),
    })
}

// === inspection and rotation ===

/// What the controller needs to know about an existing certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity (unix seconds).
    pub not_before: i64,
    /// End of validity (unix seconds).
    pub not_after: i64,
    /// DNS and IP SANs as strings.
    pub names: Vec<String>,
    /// Whether it is a CA.
    pub is_ca: bool,
}

/// Parses the first certificate of a PEM text.
pub fn inspect(pem_text: &str, what: &str) -> Result<CertInfo> {
    let der = first_der(pem_text, what)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| TlsError::Parse {
        what: what.to_string(),
        reason: e.to_string(),
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    if let Some(ip) = ip_string(ip) {
                        names.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        names,
        is_ca: cert.is_ca(),
    })
}

fn ip_string(raw: &[u8]) -> Option<String> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(raw)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

fn first_der(pem_text: &str, what: &str) -> Result<Vec<u8>> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|e| TlsError::Parse {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    Ok(pem.contents)
}

/// Whether `leaf_pem` carries a valid signature by the CA in `ca_pem`.
pub fn signed_by(leaf_pem: &str, ca_pem: &str) -> bool {
    let (Ok(leaf), Ok(ca)) = (first_der(leaf_pem, "leaf"), first_der(ca_pem, "CA")) else {
        return false;
    };
    let (Ok((_, leaf)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(&leaf),
        x509_parser::parse_x509_certificate(&ca),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

/// Why a certificate must be (re)issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotateReason {
    /// There is no certificate yet, or its Secret lacks a key.
    Missing,
    /// What is there does not parse.
    Unreadable(String),
    /// It has expired (or is not yet valid).
    Expired,
    /// It expires within `renewBefore`.
    ExpiresSoon,
    /// Its names differ from the wanted ones (the pool was scaled or renamed).
    NamesChanged,
    /// It was not signed by the current CA, or carries another CA certificate.
    CaChanged,
}

impl std::fmt::Display for RotateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RotateReason::Missing => write!(f, "missing"),
            RotateReason::Unreadable(e) => write!(f, "unreadable: {e}"),
            RotateReason::Expired => write!(f, "expired"),
            RotateReason::ExpiresSoon => write!(f, "expires within renewBefore"),
            RotateReason::NamesChanged => write!(f, "names changed"),
            RotateReason::CaChanged => write!(f, "CA changed"),
        }
    }
}

/// What clients and servers of a pool trust: the current CA and, during a CA rollover, the
/// previous one.
#[derive(Clone, Debug)]
pub struct Trust<'a> {
    /// The CA that signs new certificates.
    pub ca: &'a Ca,
    /// The previous CA certificate (PEM) while it is still valid.
    pub previous: Option<&'a str>,
    /// Whether certificates signed by `previous` must now be reissued. Until then they are
    /// kept, and only their `ca.crt` gains the new CA, so every component trusts both CAs
    /// before any presents a certificate from the new one.
    pub switch_over: bool,
}

impl Trust<'_> {
    /// The `ca.crt` every TLS Secret carries: the current CA, then the previous one.
    pub fn bundle(&self) -> String {
        match self.previous {
            Some(p) => format!("{}{}", self.ca.cert_pem, p),
            None => self.ca.cert_pem.clone(),
        }
    }
}

/// What to do with one certificate Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeafAction {
    /// It is current.
    Keep,
    /// Keep the certificate and key; rewrite `ca.crt` to the trust bundle.
    UpdateTrust,
    /// Issue a new certificate and key.
    Reissue(RotateReason),
}

/// Decides what to do with the certificate in `secret` (see [`LeafAction`]).
/// `want_names` of `None` skips the name check (client certificates).
pub fn leaf_action(
    secret: Option<&Secret>,
    trust: &Trust<'_>,
    want_names: Option<&[String]>,
    now: OffsetDateTime,
    renew_before: Duration,
) -> LeafAction {
    let Some(secret) = secret else {
        return LeafAction::Reissue(RotateReason::Missing);
    };
    let (Some(cert), Some(_key), Some(secret_ca)) = (
        secret_text(secret, CERT_KEY),
        secret_text(secret, KEY_KEY),
        secret_text(secret, CA_CERT_KEY),
    ) else {
        return LeafAction::Reissue(RotateReason::Missing);
    };
    let info = match inspect(cert, CERT_KEY) {
        Ok(info) => info,
        Err(e) => return LeafAction::Reissue(RotateReason::Unreadable(e.to_string())),
    };
    if let Some(reason) = rotation_by_time(&info, now, renew_before) {
        return LeafAction::Reissue(reason);
    }
    if let Some(want) = want_names {
        let mut have = info.names.clone();
        let mut want = want.to_vec();
        have.sort();
        want.sort();
        if have != want {
            return LeafAction::Reissue(RotateReason::NamesChanged);
        }
    }
    let by_current = signed_by(cert, &trust.ca.cert_pem);
    let by_previous = !by_current && trust.previous.is_some_and(|p| signed_by(cert, p));
    let kept_for_rollover = by_previous && !trust.switch_over;
    if !by_current && !kept_for_rollover {
        return LeafAction::Reissue(RotateReason::CaChanged);
    }
    if secret_ca != trust.bundle() {
        return LeafAction::UpdateTrust;
    }
    LeafAction::Keep
}

/// Whether the certificate in `secret` must change, for a pool with no CA rollover under way:
/// `None` keeps it. See [`leaf_action`] for the full decision.
pub fn rotation(
    secret: Option<&Secret>,
    ca: &Ca,
    want_names: Option<&[String]>,
    now: OffsetDateTime,
    renew_before: Duration,
) -> Option<RotateReason> {
    let trust = Trust {
        ca,
        previous: None,
        switch_over: true,
    };
    match leaf_action(secret, &trust, want_names, now, renew_before) {
        LeafAction::Keep => None,
        LeafAction::UpdateTrust => Some(RotateReason::CaChanged),
        LeafAction::Reissue(r) => Some(r),
    }
}

/// `Expired` or `ExpiresSoon` when `info` is past or near its end, else `None`.
pub fn rotation_by_time(
    info: &CertInfo,
    now: OffsetDateTime,
    renew_before: Duration,
) -> Option<RotateReason> {
    let now = now.unix_timestamp();
    let renew = i64::try_from(renew_before.as_secs()).unwrap_or(i64::MAX);
    if now >= info.not_after || now < info.not_before {
        Some(RotateReason::Expired)
    } else if now >= info.not_after.saturating_sub(renew) {
        Some(RotateReason::ExpiresSoon)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    #[test]
    fn server_names_cover_gateway_and_every_worker() {
        let names = server_names("p", "ns", 2);
        for n in [
            "p-gateway",
            "p-gateway.ns",
            "p-gateway.ns.svc",
            "p-gateway.ns.svc.cluster.local",
            "p-worker-0.p-workers.ns.svc",
            "p-worker-1.p-workers.ns.svc.cluster.local",
            "localhost",
            "127.0.0.1",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        assert!(!names.iter().any(|x| x.starts_with("p-worker-2")));
    }

    #[test]
    fn issued_server_cert_has_sans_validity_and_chain() {
        let ca = issue_ca("p", now(), 90 * DAY).unwrap();
        let names = server_names("p", "ns", 3);
        let leaf = issue(&ca, "p-gateway", &names, Usage::Server, now(), 90 * DAY).unwrap();
        let info = inspect(&leaf.cert_pem, "leaf").unwrap();
        let mut got = info.names.clone();
        let mut want = names.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(!info.is_ca);
        assert_eq!(info.not_after, now().unix_timestamp() + 90 * 86_400);
        assert!(info.not_before < now().unix_timestamp());
        let ca_info = inspect(&ca.cert_pem, "ca").unwrap();
        assert!(ca_info.is_ca);
        assert!(ca_info.not_after > info.not_after);
        assert!(signed_by(&leaf.cert_pem, &ca.cert_pem));
        let other = issue_ca("q", now(), DAY).unwrap();
        assert!(!signed_by(&leaf.cert_pem, &other.cert_pem));
    }

    #[test]
    fn rotation_decisions() {
        let ca = issue_ca("p", now(), 90 * DAY).unwrap();
        let names = server_names("p", "ns", 2);
        let leaf = issue(&ca, "p", &names, Usage::Server, now(), 90 * DAY).unwrap();
        let secret = tls_secret(ObjectMeta::default(), &leaf);
        let renew = 30 * DAY;
        let at = |days: i64| now() + time::Duration::days(days);

        assert_eq!(
            rotation(Some(&secret), &ca, Some(&names), at(1), renew),
            None
        );
        assert_eq!(
            rotation(Some(&secret), &ca, Some(&names), at(61), renew),
            Some(RotateReason::ExpiresSoon)
        );
        assert_eq!(
            rotation(Some(&secret), &ca, Some(&names), at(91), renew),
            Some(RotateReason::Expired)
        );
        let scaled = server_names("p", "ns", 3);
        assert_eq!(
            rotation(Some(&secret), &ca, Some(&scaled), at(1), renew),
            Some(RotateReason::NamesChanged)
        );
        assert_eq!(rotation(Some(&secret), &ca, None, at(1), renew), None);
        let new_ca = issue_ca("p", now(), 90 * DAY).unwrap();
        assert_eq!(
            rotation(Some(&secret), &new_ca, Some(&names), at(1), renew),
            Some(RotateReason::CaChanged)
        );
        assert_eq!(
            rotation(None, &ca, Some(&names), at(1), renew),
            Some(RotateReason::Missing)
        );
        let mut broken = secret.clone();
        if let Some(d) = broken.data.as_mut() {
            d.insert(CERT_KEY.into(), ByteString(b"not a cert".to_vec()));
        }
        assert!(matches!(
            rotation(Some(&broken), &ca, Some(&names), at(1), renew),
            Some(RotateReason::Unreadable(_))
        ));
        let mut keyless = secret;
        if let Some(d) = keyless.data.as_mut() {
            d.remove(KEY_KEY);
        }
        assert_eq!(
            rotation(Some(&keyless), &ca, Some(&names), at(1), renew),
            Some(RotateReason::Missing)
        );
    }

    #[test]
    fn ca_rollover_first_spreads_trust_then_reissues() {
        let old = issue_ca("p", now(), 90 * DAY).unwrap();
        let new = issue_ca("p", now(), 90 * DAY).unwrap();
        let leaf = issue(&old, "kiln-user", &[], Usage::Client, now(), 90 * DAY).unwrap();
        let secret = tls_secret(ObjectMeta::default(), &leaf);
        let mut trust = Trust {
            ca: &new,
            previous: Some(&old.cert_pem),
            switch_over: false,
        };
        let act = |s: &Secret, t: &Trust<'_>| leaf_action(Some(s), t, None, now(), 30 * DAY);
        // Phase 1: keep the old-CA certificate, but trust both CAs.
        assert_eq!(act(&secret, &trust), LeafAction::UpdateTrust);
        let bundled = tls_secret(
            ObjectMeta::default(),
            &Issued {
                ca_pem: trust.bundle(),
                ..leaf.clone()
            },
        );
        assert_eq!(act(&bundled, &trust), LeafAction::Keep);
        // Phase 2: certificates from the old CA go.
        trust.switch_over = true;
        assert_eq!(
            act(&bundled, &trust),
            LeafAction::Reissue(RotateReason::CaChanged)
        );
        // A certificate from neither CA goes at once.
        let stranger = issue_ca("q", now(), DAY).unwrap();
        let foreign = issue(&stranger, "x", &[], Usage::Client, now(), 90 * DAY).unwrap();
        trust.switch_over = false;
        assert_eq!(
            act(&tls_secret(ObjectMeta::default(), &foreign), &trust),
            LeafAction::Reissue(RotateReason::CaChanged)
        );
        // The bundle lists the new CA first.
        assert!(trust.bundle().starts_with(&new.cert_pem));
        assert!(trust.bundle().ends_with(&old.cert_pem));
    }

    #[test]
    fn zero_lifetime_is_an_error() {
        let e = issue_ca("p", now(), Duration::ZERO).unwrap_err();
        assert!(
            e.to_string().contains("invalid certificate lifetime"),
            "{e}"
        );
    }
}
