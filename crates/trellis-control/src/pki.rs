//! The control plane's certificate authority.
//!
//! One ECDSA P-256 CA per control plane, kept as `ca.pem` + `ca.key` (mode
//! 0600) in the data directory. It signs agent certificates from their CSRs
//! (the agent's private key never leaves its host) and issues the certificate
//! of the control plane's own HTTPS listener. Agents pin the CA by the SHA-256
//! of its DER, which the join token carries.
//!
//! This module never writes a private key anywhere but `ca.key`, and never
//! signs a CSR whose self-signature does not verify.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SecureRandom;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// File name of the CA certificate in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key in the data directory.
pub const CA_KEY_FILE: &str = "ca.key";

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const AGENT_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of the certificate authority.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a CA file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// Exactly one of `ca.pem` / `ca.key` exists.
    #[error(
        "found {} but not {}: restore the missing file, or remove both to create a new CA (every agent must then re-enroll)",
        present.display(),
        missing.display()
    )]
    PartialCa { present: PathBuf, missing: PathBuf },
    /// A stored CA file does not parse, or the key does not belong to the certificate.
    #[error("the CA in {} is unusable: {reason}", path.display())]
    CorruptCa { path: PathBuf, reason: String },
    /// The CSR is not a PEM/DER PKCS#10 request rcgen can read.
    #[error("the certificate signing request is malformed: {0}")]
    MalformedCsr(String),
    /// The CSR's self-signature does not verify: it was altered or made with another key.
    #[error("the certificate signing request's signature does not verify")]
    BadCsrSignature,
    /// A name for a certificate is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid DNS name or IP address for a certificate")]
    InvalidName(String),
    /// Key generation or signing failed inside rcgen/aws-lc.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system's random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// A certificate the CA signed for an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// PEM of the certificate alone (not the chain).
    pub pem: String,
    /// Lower-case hex SHA-256 of the certificate DER: the agent's identity on the wire.
    pub sha256_hex: String,
    pub not_after: SystemTime,
}

/// The loaded certificate authority.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    sha256_hex: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("sha256", &self.sha256_hex).field("key", &"***").finish()
    }
}

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

/// `bytes` random bytes from the system CSPRNG, as lower-case hex (2 × `bytes` characters).
///
/// Panics when the operating system's random source fails (`getrandom`
/// failing means the host cannot do cryptography at all).
pub fn random_hex(bytes: usize) -> String {
    hex::encode(random_bytes(bytes).expect("the system random number generator failed"))
}

fn random_bytes(n: usize) -> Result<Vec<u8>, PkiError> {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::SystemRandom::new().fill(&mut buf).map_err(|_| PkiError::Random)?;
    Ok(buf)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = random_bytes(16)?;
    // A positive INTEGER, never zero-length after DER minimisation.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(from: SystemTime, length: Duration) -> (time::OffsetDateTime, time::OffsetDateTime, SystemTime) {
    let not_before = from - BACKDATE;
    let not_after = from + length;
    (not_before.into(), not_after.into(), not_after)
}

/// Writes `contents` to `path` through a temporary file and a rename, with `mode`.
fn write_file_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension(format!("tmp-{}", random_hex(4)));
    let io = |action, source| PkiError::Io { action, path: path.to_path_buf(), source };
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| io("create", e))?;
    let result = file.write_all(contents).and_then(|()| file.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    Ok(())
}

/// Writes a secret (a private key, the admin key) readable by the owner only.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file_atomic(path, contents, 0o600)
}

/// Writes a public file (a certificate).
pub fn write_public_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    write_file_atomic(path, contents, 0o644)
}

fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { action: "read", path: path.to_path_buf(), source })
}

/// Checks that `name` can go into the server certificate (a DNS name or an
/// IP address), before anything is created.
pub fn check_server_name(name: &str) -> Result<(), PkiError> {
    parse_name(name).map(|_| ())
}

fn parse_name(name: &str) -> Result<SanType, PkiError> {
    let invalid = || PkiError::InvalidName(name.to_string());
    let trimmed = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = trimmed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_dns = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !valid_dns {
        return Err(invalid());
    }
    Ok(SanType::DnsName(name.to_ascii_lowercase().try_into().map_err(|_| invalid())?))
}

impl Ca {
    /// Loads `DIR/ca.pem` + `DIR/ca.key`, or creates a new CA there when neither exists.
    pub fn load_or_create(data_dir: &Path) -> Result<Ca, PkiError> {
        let cert_path = data_dir.join(CA_CERT_FILE);
        let key_path = data_dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => Self::create(&cert_path, &key_path),
            (true, false) => Err(PkiError::PartialCa { present: cert_path, missing: key_path }),
            (false, true) => Err(PkiError::PartialCa { present: key_path, missing: cert_path }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_file(cert_path)?;
        let key_pem = read_file(key_path)?;
        let corrupt = |path: &Path, reason: String| PkiError::CorruptCa { path: path.to_path_buf(), reason };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| corrupt(key_path, e.to_string()))?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| corrupt(cert_path, format!("not a PEM certificate: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| corrupt(cert_path, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(corrupt(key_path, format!("the key does not belong to {}", cert_path.display())));
        }
        if !parsed.is_ca() {
            return Err(corrupt(cert_path, "the certificate is not a CA certificate".into()));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| corrupt(cert_path, e.to_string()))?;
        let sha256_hex = sha256_hex(&cert_der);
        Ok(Ca { cert_pem, cert_der, sha256_hex, issuer })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, format!("Trellis CA {}", random_hex(4)));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let (not_before, not_after, _) = validity(SystemTime::now(), CA_VALIDITY);
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        // Key first: a crash in between leaves a key without a certificate,
        // which `load_or_create` reports instead of silently replacing.
        write_secret_file(key_path, key.serialize_pem().as_bytes())?;
        write_public_file(cert_path, cert_pem.as_bytes())?;
        let cert_der = cert.der().clone();
        let sha256_hex = sha256_hex(&cert_der);
        let issuer = Issuer::new(params, key);
        Ok(Ca { cert_pem, cert_der, sha256_hex, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Lower-case hex SHA-256 of the CA certificate's DER (what join tokens carry).
    pub fn cert_sha256_hex(&self) -> &str {
        &self.sha256_hex
    }

    /// Verifies `csr_pem` and signs an agent certificate for its key.
    ///
    /// Whatever names or extensions the CSR requests are ignored: the
    /// certificate names exactly this agent (DNS SAN
    /// [`trellis_proto::agent_server_name`], URI SAN
    /// `trellis:agent/<agent>?account=<account>&vpc=<vpc>`) and allows both
    /// client and server authentication.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        agent_id: &str,
        account_id: &str,
        vpc_id: &str,
    ) -> Result<IssuedCert, PkiError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, account_id);
        dn.push(DnType::OrganizationalUnitName, vpc_id);
        dn.push(DnType::CommonName, agent_id);
        let dns = trellis_proto::agent_server_name(agent_id);
        let uri = trellis_proto::AgentIdentityUri {
            agent_id: agent_id.to_string(),
            account_id: account_id.to_string(),
            vpc_id: vpc_id.to_string(),
        }
        .to_uri();
        self.sign_csr(csr_pem, dn, &dns, &uri)
    }

    /// Verifies `csr_pem` and signs a relay certificate for its key, naming
    /// exactly this relay (DNS SAN [`trellis_proto::relay_server_name`], URI
    /// SAN [`trellis_proto::relay_identity_uri`]) and never an agent: no
    /// `trellis:agent/` URI, so agents refuse it as a peer agent and the
    /// agent routes find no agent for it.
    pub fn sign_relay_csr(&self, csr_pem: &str, relay_id: &str) -> Result<IssuedCert, PkiError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis relays");
        dn.push(DnType::CommonName, relay_id);
        let dns = trellis_proto::relay_server_name(relay_id);
        let uri = trellis_proto::relay_identity_uri(relay_id);
        self.sign_csr(csr_pem, dn, &dns, &uri)
    }

    /// Signs a client-and-server certificate for the key of `csr_pem` with
    /// exactly this subject and these two names, ignoring what the CSR asks.
    fn sign_csr(&self, csr_pem: &str, dn: DistinguishedName, dns: &str, uri: &str) -> Result<IssuedCert, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => PkiError::BadCsrSignature,
            other => PkiError::MalformedCsr(other.to_string()),
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let invalid = |s: &str| PkiError::InvalidName(s.to_string());
        params.subject_alt_names = vec![
            SanType::DnsName(dns.try_into().map_err(|_| invalid(dns))?),
            SanType::URI(uri.try_into().map_err(|_| invalid(uri))?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after_odt, not_after) = validity(SystemTime::now(), AGENT_CERT_VALIDITY);
        params.not_before = not_before;
        params.not_after = not_after_odt;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert { pem: cert.pem(), sha256_hex: sha256_hex(cert.der()), not_after })
    }

    /// Issues a fresh key and certificate for the control plane's HTTPS
    /// listener, naming every entry of `names` (IP addresses as IP SANs,
    /// everything else as DNS SANs). Returns `(cert_pem, key_pem)`.
    pub fn issue_server_cert(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut sans = Vec::new();
        for name in names {
            let san = parse_name(name)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, "trellis control plane");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after, _) = validity(SystemTime::now(), SERVER_CERT_VALIDITY);
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn agent_csr() -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "agent");
        let csr = params.serialize_request(&key).unwrap();
        (csr.pem().unwrap(), key)
    }

    fn sans(der: &[u8]) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let mut out = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for name in &san.general_names {
                    out.push(match name {
                        GeneralName::DNSName(d) => format!("dns:{d}"),
                        GeneralName::URI(u) => format!("uri:{u}"),
                        GeneralName::IPAddress(ip) => format!("ip:{}", hex::encode(ip)),
                        other => format!("{other:?}"),
                    });
                }
            }
        }
        out
    }

    /// PEM-encodes `der` (test helper; the crate needs no base64 otherwise).
    fn pem(label: &str, der: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
    }

    #[test]
    fn ca_is_created_once_and_reloaded_with_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_sha256_hex(), again.cert_sha256_hex());
        assert_eq!(ca.cert_pem(), again.cert_pem());
        assert_eq!(ca.cert_sha256_hex().len(), 64);
        let (_, parsed) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(parsed.is_ca());
        let years = (parsed.validity().not_after.timestamp() - parsed.validity().not_before.timestamp()) / 86400 / 365;
        assert!((9..=10).contains(&years), "{years} years");
        // A certificate signed by the reloaded CA chains to the original one.
        let (csr, _) = agent_csr();
        let issued = again.sign_agent_csr(&csr, "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        leaf.verify_signature(Some(parsed.public_key())).unwrap();
    }

    /// A control plane upgraded from a build on ring keeps its CA: the key
    /// and certificate in `testdata/ring-ca` were written by that build
    /// (`trellis dev`, 2026-12-03) and still load and sign.
    #[test]
    fn a_ca_written_by_the_ring_build_loads_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/ring-ca");
        for name in [CA_CERT_FILE, CA_KEY_FILE] {
            fs::copy(fixture.join(name), dir.path().join(name)).unwrap();
        }
        let ca = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.cert_pem(), fs::read_to_string(fixture.join(CA_CERT_FILE)).unwrap(), "the CA was not replaced");
        let (csr, _) = agent_csr();
        let issued = ca.sign_agent_csr(&csr, "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
    }

    #[test]
    fn half_a_ca_is_an_error_not_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let err = Ca::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, PkiError::PartialCa { .. }), "{err}");
        assert!(err.to_string().contains("re-enroll"));
    }

    #[test]
    fn a_key_of_another_ca_is_rejected() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        Ca::load_or_create(a.path()).unwrap();
        Ca::load_or_create(b.path()).unwrap();
        fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(Ca::load_or_create(a.path()), Err(PkiError::CorruptCa { .. })));
    }

    #[test]
    fn signed_agent_cert_names_the_agent_and_ignores_requested_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (csr, key) = agent_csr();
        let agent = "agent-0123456789abcdef0";
        let issued = ca.sign_agent_csr(&csr, agent, "acct-000000000001", "vpc-0123456789abcdef0").unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        assert_eq!(issued.sha256_hex, sha256_hex(&der));
        assert_eq!(
            sans(&der),
            vec![
                format!("dns:{}", trellis_proto::agent_server_name(agent)),
                format!("uri:trellis:agent/{agent}?account=acct-000000000001&vpc=vpc-0123456789abcdef0"),
            ]
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let not_after = cert.validity().not_after.timestamp();
        assert!(cert.validity().not_before.timestamp() <= now);
        assert!((360 * 86400..=366 * 86400).contains(&(not_after - now)));
        let reported = issued.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(reported, not_after);
    }

    #[test]
    fn signed_relay_cert_names_the_relay_and_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (csr, _) = agent_csr();
        let relay = "relay-0123456789abcdef0";
        let issued = ca.sign_relay_csr(&csr, relay).unwrap();
        let der = CertificateDer::from_pem_slice(issued.pem.as_bytes()).unwrap();
        assert_eq!(
            sans(&der),
            vec![format!("dns:{relay}.relays.trellis.internal"), format!("uri:trellis:relay/{relay}")]
        );
        // The agent's peer check (`trellis-agent` tls::peer_identity) reads the
        // URI SAN with this parser: a relay's is no agent identity.
        assert!(sans(&der).iter().all(|s| trellis_proto::AgentIdentityUri::parse(&s[4..]).is_none()));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    }

    #[test]
    fn tampered_csr_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (csr, _) = agent_csr();
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        // Flip a byte inside the subject's CommonName ("agent"), keeping the DER well formed.
        let at = bytes.windows(5).position(|w| w == b"agent").unwrap();
        bytes[at] = b'b';
        let tampered = pem("CERTIFICATE REQUEST", &bytes);
        let err = ca.sign_agent_csr(&tampered, "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap_err();
        assert!(matches!(err, PkiError::BadCsrSignature), "{err}");
        let err = ca.sign_agent_csr("not a csr", "agent-0123456789abcdef0", "acct-000000000001", "vpc-1").unwrap_err();
        assert!(matches!(err, PkiError::MalformedCsr(_)), "{err}");
    }

    #[test]
    fn server_cert_has_ip_and_dns_names() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let names: Vec<String> =
            ["localhost", "127.0.0.1", "::1", "cp.example.com", "localhost"].iter().map(|s| s.to_string()).collect();
        let (cert_pem, key_pem) = ca.issue_server_cert(&names).unwrap();
        assert!(key_pem.contains("PRIVATE KEY"));
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        assert_eq!(
            sans(&der),
            vec![
                "dns:localhost".to_string(),
                "ip:7f000001".to_string(),
                format!("ip:{}01", "0".repeat(30)),
                "dns:cp.example.com".to_string(),
            ]
        );
        assert!(matches!(ca.issue_server_cert(&["bad name!".into()]), Err(PkiError::InvalidName(_))));
    }

    #[test]
    fn random_hex_has_the_requested_length_and_varies() {
        assert_eq!(random_hex(17).len(), 34);
        assert_ne!(random_hex(16), random_hex(16));
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
