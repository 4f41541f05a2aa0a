//! `tessera serve --tee`: the keys made in the guest, the evidence that binds them, the
//! signatures over each exchange, and the TLS certificate whose key the evidence names.
//!
//! Cost: a report asks the TEE once (a few milliseconds in a guest), at most [`REPORTS_AT_ONCE`]
//! at a time; a signature costs one BLAKE3 pass over the request and response bytes and one
//! Ed25519 signature (~20 µs); the last [`SIGNATURES_KEPT`] signatures are held for
//! `GET /v1/signature/{id}` (~300 bytes each: ~5 MB). No prompt or completion is kept: only
//! their hashes, inside the signatures.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sha2::Digest as _;
use tessera_trust::serving::{self, ResponseSignature, ServerAttestation};
use tessera_trust::tee::Attester;
use tessera_trust::{Identity, OpeningKey, SealingKey};

use crate::ServeError;

/// Evidence requests served at once; more wait.
pub const REPORTS_AT_ONCE: usize = 4;
/// How long a report may take; the TEE's firmware answers in milliseconds.
pub const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Signatures kept for `GET /v1/signature/{id}`, oldest dropped first.
pub const SIGNATURES_KEPT: usize = 16_384;

/// The keys made in this process, and where its evidence comes from.
pub struct Attested {
    signer: Identity,
    opener: OpeningKey,
    tls_spki_sha256: Option<[u8; 32]>,
    binary_blake3: [u8; 32],
    attester: Attester,
    reports: Arc<tokio::sync::Semaphore>,
    signatures: Mutex<Signatures>,
}

#[derive(Default)]
struct Signatures {
    by_id: HashMap<String, (i64, ResponseSignature)>,
    order: VecDeque<String>,
}

impl Attested {
    /// New keys, made here and never written out. `tls_spki_sha256`: the certificate key's hash
    /// when this process terminates TLS ([`tls`]).
    pub fn new(
        attester: Attester,
        binary_blake3: [u8; 32],
        tls_spki_sha256: Option<[u8; 32]>,
    ) -> Result<Attested, ServeError> {
        let key = |e: tessera_trust::TrustError| ServeError::Invalid(format!("making keys: {e}"));
        Ok(Attested {
            signer: Identity::generate().map_err(key)?,
            opener: OpeningKey::generate().map_err(key)?,
            tls_spki_sha256,
            binary_blake3,
            attester,
            reports: Arc::new(tokio::sync::Semaphore::new(REPORTS_AT_ONCE)),
            signatures: Mutex::new(Signatures::default()),
        })
    }

    pub fn insecure(&self) -> bool {
        matches!(self.attester, Attester::InsecureDev)
    }

    pub fn signing_key(&self) -> tessera_trust::PublicKey {
        self.signer.public()
    }

    pub fn sealing_key(&self) -> &SealingKey {
        self.opener.public()
    }

    /// Fresh evidence for `nonce`, binding the keys, the model served now and this binary.
    pub async fn report(
        self: &Arc<Self>,
        model: &str,
        model_blake3: [u8; 32],
        nonce: [u8; 32],
    ) -> Result<ServerAttestation, ServeError> {
        let permit = self.reports.clone().acquire_owned().await.map_err(|e| ServeError::Invalid(e.to_string()))?;
        let data = serving::server_report_data(
            &self.signer.public().0,
            &self.opener.public().0,
            self.tls_spki_sha256.as_ref(),
            model,
            &model_blake3,
            &self.binary_blake3,
            &nonce,
        );
        let this = self.clone();
        // configfs-tsm is file I/O that waits on the TEE's firmware. The permit stays with the
        // blocking call, so calls that never return still count against the limit.
        let asked = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.attester.evidence(&data)
        });
        let evidence = tokio::time::timeout(REPORT_TIMEOUT, asked)
            .await
            .map_err(|_| ServeError::Invalid(format!("the TEE gave no report within {} s", REPORT_TIMEOUT.as_secs())))?
            .map_err(|e| ServeError::Invalid(e.to_string()))?
            .map_err(ServeError::Invalid)?;
        Ok(ServerAttestation {
            model: model.to_owned(),
            model_blake3: hex::encode(model_blake3),
            binary_blake3: hex::encode(self.binary_blake3),
            signing_key: self.signer.public().hex(),
            sealing_key: hex::encode(self.opener.public().0),
            tls_spki_sha256: self.tls_spki_sha256.map(hex::encode),
            nonce: hex::encode(nonce),
            evidence,
        })
    }

    /// Opens a request body the client sealed to this server, naming `client` as its key.
    pub fn open_request(&self, client: &SealingKey, sealed: &[u8]) -> Result<Vec<u8>, ServeError> {
        serving::open_request(&self.opener, client, sealed).map_err(|e| ServeError::Invalid(e.to_string()))
    }

    /// Signs an exchange and keeps the signature for the key that made it.
    pub fn sign(&self, key_id: i64, id: &str, request: &blake3::Hash, response: &blake3::Hash) -> ResponseSignature {
        let signature = ResponseSignature::sign(&self.signer, id, request, response);
        if let Ok(mut kept) = self.signatures.lock() {
            if kept.by_id.insert(id.to_owned(), (key_id, signature.clone())).is_none() {
                kept.order.push_back(id.to_owned());
            }
            while kept.order.len() > SIGNATURES_KEPT {
                if let Some(old) = kept.order.pop_front() {
                    kept.by_id.remove(&old);
                }
            }
        }
        signature
    }

    /// A kept signature, only for the key whose request it was.
    pub fn signature(&self, key_id: i64, id: &str) -> Option<ResponseSignature> {
        let kept = self.signatures.lock().ok()?;
        kept.by_id.get(id).filter(|(k, _)| *k == key_id).map(|(_, s)| s.clone())
    }
}

/// A TLS acceptor with a self-signed certificate whose ECDSA P-256 key is made here (the
/// client pins it through the attestation, not a CA), and the SHA-256 of its
/// SubjectPublicKeyInfo.
pub fn tls(names: Vec<String>) -> Result<(tokio_rustls::TlsAcceptor, [u8; 32]), ServeError> {
    use rcgen::PublicKeyData as _;
    let bad = |e: String| ServeError::Invalid(format!("TLS certificate: {e}"));
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| bad(e.to_string()))?;
    let spki: [u8; 32] = sha2::Sha256::digest(certified.signing_key.subject_public_key_info()).into();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), spki))
}

/// SHA-256 of a DER certificate's SubjectPublicKeyInfo: what a client compares with the
/// attested `tls_spki_sha256`.
pub fn spki_sha256(certificate_der: &[u8]) -> Result<[u8; 32], ServeError> {
    use x509_cert::der::{Decode as _, Encode as _};
    let cert = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| ServeError::Invalid(format!("the server's certificate: {e}")))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| ServeError::Invalid(format!("the server's certificate: {e}")))?;
    Ok(sha2::Sha256::digest(spki).into())
}
pub use tokio_rustls::TlsAcceptor;
