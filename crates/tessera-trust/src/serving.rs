//! Verifiable serving: what `tessera serve --tee` attests, signs and seals, and what a client
//! checks.
//!
//! - **Attestation.** The server makes three keys inside the guest — an Ed25519 key that signs
//!   responses, an X25519 HPKE key requests are sealed to, and (with TLS) its certificate's key —
//!   and asks the TEE for evidence whose 64-byte `report_data` is [`server_report_data`]: a
//!   BLAKE3 over the two public keys, the certificate key's SHA-256, the model id, the weights'
//!   BLAKE3, the serving binary's BLAKE3 and the client's 32-byte nonce. A fresh nonce per check
//!   makes a replayed report useless.
//! - **Signatures.** Each completion is signed over its id and the BLAKE3 of the exact request
//!   body bytes received and response body bytes sent ([`response_message`]); for a sealed
//!   exchange those are the ciphertexts, so the signature reveals nothing of the prompt.
//! - **Sealing.** A client seals its request body to the server's HPKE key ([`seal_request`],
//!   naming its own X25519 key in the `x-tessera-seal-to` header, which is bound as associated
//!   data); the server seals the response, or each streamed event, back to that key, bound to
//!   the request's ciphertext and the event's index ([`seal_response`]), so a gateway can
//!   neither read, reorder, drop from the middle, nor graft a response onto another request.
//!
//! HPKE is RFC 9180 base mode (DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305).

use serde::{Deserialize, Serialize};

use crate::attest::{self, AttestationPolicy, Evidence, Verified};
use crate::envelope::{OpeningKey, SealingKey, seal_raw};
use crate::{PublicKey, TrustError};

/// The response header carrying the signature of a whole (not streamed) response.
pub const SIGNATURE_HEADER: &str = "x-tessera-response-signature";
/// The response header naming the completion's id (also in its body), for
/// `GET /v1/signature/{id}`.
pub const RESPONSE_ID_HEADER: &str = "x-tessera-response-id";
/// The request header naming the client's X25519 key (hex): the body is sealed, and the
/// response is sealed back to this key.
pub const SEAL_TO_HEADER: &str = "x-tessera-seal-to";
/// The request header asking the server to refuse model aliases: the request names the exact
/// model the attestation binds, or fails.
pub const STRICT_HEADER: &str = "x-tessera-strict";
/// The content type of a sealed body.
pub const SEALED_CONTENT_TYPE: &str = "application/vnd.tessera.sealed";
/// A streamed response's signature comes after its last event as an SSE comment beginning with
/// this (comments are ignored by SSE clients), and is not part of the signed bytes.
pub const STREAM_SIGNATURE_PREFIX: &str = ": tessera-signature ";

const REQUEST_INFO: &[u8] = b"tessera/v1/serve-request";
const RESPONSE_INFO: &[u8] = b"tessera/v1/serve-response";

/// What `GET /v1/attestation/report?nonce=…` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerAttestation {
    /// The model id requests must name (in strict mode, exactly).
    pub model: String,
    /// BLAKE3 of the served weights (`model.safetensors`), hex.
    pub model_blake3: String,
    /// BLAKE3 of the serving binary, hex.
    pub binary_blake3: String,
    /// The Ed25519 key that signs responses, hex.
    pub signing_key: String,
    /// The X25519 HPKE key requests may be sealed to, hex.
    pub sealing_key: String,
    /// SHA-256 of the TLS certificate's SubjectPublicKeyInfo (DER), hex, when the server
    /// terminates TLS itself.
    pub tls_spki_sha256: Option<String>,
    /// The client's nonce, hex (32 bytes).
    pub nonce: String,
    pub evidence: Evidence,
}

/// What a client expects of the attestation beyond the TEE policy.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// The nonce this client sent.
    pub nonce: [u8; 32],
    /// The weights' BLAKE3 the client wants served (from a release's model card, say).
    pub model_blake3: Option<String>,
    /// The serving binary's BLAKE3 (from a reproducible build).
    pub binary_blake3: Option<String>,
    /// The SPKI SHA-256 of the certificate the client's TLS connection saw.
    pub tls_spki_sha256: Option<[u8; 32]>,
}

/// The 64 bytes of `report_data` a serving TEE's evidence carries.
pub fn server_report_data(
    signing_key: &[u8; 32],
    sealing_key: &[u8; 32],
    tls_spki_sha256: Option<&[u8; 32]>,
    model: &str,
    model_blake3: &[u8; 32],
    binary_blake3: &[u8; 32],
    nonce: &[u8; 32],
) -> [u8; 64] {
    let mut h = blake3::Hasher::new_derive_key("tessera 2026 serving keys v1");
    h.update(signing_key);
    h.update(sealing_key);
    match tls_spki_sha256 {
        Some(t) => h.update(&[1]).update(t),
        None => h.update(&[0]),
    };
    h.update(&(model.len() as u64).to_le_bytes()).update(model.as_bytes());
    h.update(model_blake3);
    h.update(binary_blake3);
    h.update(nonce);
    let mut out = [0u8; 64];
    h.finalize_xof().fill(&mut out);
    out
}

fn bytes32(what: &str, s: &str) -> Result<[u8; 32], TrustError> {
    let mut b = [0u8; 32];
    hex::decode_to_slice(s, &mut b).map_err(|_| TrustError::BadKey(format!("{what} is not 64 hex digits")))?;
    Ok(b)
}

fn refuse(reason: String) -> TrustError {
    TrustError::Attestation { kind: "serving", reason }
}

impl ServerAttestation {
    /// The public keys it attests: (response signing key, request sealing key).
    pub fn keys(&self) -> Result<(PublicKey, SealingKey), TrustError> {
        Ok((PublicKey::parse(&self.signing_key)?, SealingKey::parse(&self.sealing_key)?))
    }

    /// The report data this attestation's evidence must carry.
    pub fn report_data(&self) -> Result<[u8; 64], TrustError> {
        let (signing, sealing) = self.keys()?;
        let tls = self.tls_spki_sha256.as_deref().map(|t| bytes32("tls_spki_sha256", t)).transpose()?;
        Ok(server_report_data(
            &signing.0,
            &sealing.0,
            tls.as_ref(),
            &self.model,
            &bytes32("model_blake3", &self.model_blake3)?,
            &bytes32("binary_blake3", &self.binary_blake3)?,
            &bytes32("nonce", &self.nonce)?,
        ))
    }

    /// Checks, in order: the nonce is the client's, the model and binary are the expected ones,
    /// the TLS key is the connection's, then the evidence under `policy` at `now_secs` and that
    /// it commits to all of the above.
    pub fn verify(
        &self,
        policy: &AttestationPolicy,
        expected: &Expected,
        now_secs: u64,
    ) -> Result<Verified, TrustError> {
        if bytes32("nonce", &self.nonce)? != expected.nonce {
            return Err(refuse("the report answers another nonce: a replayed or foreign report".into()));
        }
        if let Some(want) = &expected.model_blake3
            && !want.eq_ignore_ascii_case(&self.model_blake3)
        {
            return Err(refuse(format!("the server serves weights {} but {want} were expected", self.model_blake3)));
        }
        if let Some(want) = &expected.binary_blake3
            && !want.eq_ignore_ascii_case(&self.binary_blake3)
        {
            return Err(refuse(format!("the server runs binary {} but {want} was expected", self.binary_blake3)));
        }
        if let Some(seen) = expected.tls_spki_sha256 {
            match self.tls_spki_sha256.as_deref().map(|t| bytes32("tls_spki_sha256", t)).transpose()? {
                Some(attested) if attested == seen => {}
                Some(_) => {
                    return Err(refuse(
                        "the TLS certificate's key is not the attested one: something else terminates TLS".into(),
                    ));
                }
                None => return Err(refuse("the server attests no TLS key, but the connection used TLS".into())),
            }
        }
        attest::verify(&self.evidence, policy, &self.report_data()?, now_secs)
    }
}

/// What a response's signature covers.
pub fn response_message(id: &str, request_blake3: &[u8; 32], response_blake3: &[u8; 32]) -> Vec<u8> {
    let mut m = b"tessera-serve-response-v1\n".to_vec();
    m.extend_from_slice(id.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(request_blake3);
    m.extend_from_slice(response_blake3);
    m
}

/// What `GET /v1/signature/{id}` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseSignature {
    pub id: String,
    /// BLAKE3 of the request body bytes as received, hex.
    pub request_blake3: String,
    /// BLAKE3 of the response body bytes as sent (for a stream: every event up to and
    /// including `[DONE]`, not the signature comment), hex.
    pub response_blake3: String,
    /// Ed25519, over [`response_message`], hex.
    pub signature: String,
}

impl ResponseSignature {
    pub fn sign(signer: &crate::Identity, id: &str, request: &blake3::Hash, response: &blake3::Hash) -> Self {
        ResponseSignature {
            id: id.to_owned(),
            request_blake3: request.to_hex().to_string(),
            response_blake3: response.to_hex().to_string(),
            signature: signer.sign_hex(&response_message(id, request.as_bytes(), response.as_bytes())),
        }
    }

    /// Checks that this signature is `key`'s (the attested key, not one the response names)
    /// over exactly these request and response bytes.
    pub fn verify(&self, key: &PublicKey, id: &str, request: &[u8], response: &[u8]) -> Result<(), TrustError> {
        if self.id != id {
            return Err(TrustError::BadRequest(format!("the signature is for {}, not {id}", self.id)));
        }
        let (req, resp) = (blake3::hash(request), blake3::hash(response));
        if !self.request_blake3.eq_ignore_ascii_case(&req.to_hex()) {
            return Err(TrustError::BadRequest("the signature covers another request".into()));
        }
        if !self.response_blake3.eq_ignore_ascii_case(&resp.to_hex()) {
            return Err(TrustError::BadRequest("the signature covers another response: it was altered".into()));
        }
        key.verify_hex(&response_message(id, req.as_bytes(), resp.as_bytes()), &self.signature)
    }
}

/// Seals a request body to the server's `sealing_key`, for the client whose response key is
/// `client` (sent as the `x-tessera-seal-to` header).
pub fn seal_request(sealing_key: &SealingKey, client: &SealingKey, body: &[u8]) -> Result<Vec<u8>, TrustError> {
    seal_raw(&sealing_key.0, REQUEST_INFO, &client.0, body)
}

/// The server opens a sealed request body.
pub fn open_request(opener: &OpeningKey, client: &SealingKey, sealed: &[u8]) -> Result<Vec<u8>, TrustError> {
    opener.open_raw(REQUEST_INFO, &client.0, sealed)
}

fn response_aad(sealed_request: &[u8], index: u64) -> Vec<u8> {
    let mut aad = blake3::hash(sealed_request).as_bytes().to_vec();
    aad.extend_from_slice(&index.to_le_bytes());
    aad
}

/// The server seals a response body (index 0), or a stream's `index`-th event, to the client.
pub fn seal_response(
    client: &SealingKey,
    sealed_request: &[u8],
    index: u64,
    plaintext: &[u8],
) -> Result<Vec<u8>, TrustError> {
    seal_raw(&client.0, RESPONSE_INFO, &response_aad(sealed_request, index), plaintext)
}

/// The client opens the response to its `sealed_request` (or its stream's `index`-th event).
pub fn open_response(
    client: &OpeningKey,
    sealed_request: &[u8],
    index: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, TrustError> {
    client.open_raw(RESPONSE_INFO, &response_aad(sealed_request, index), sealed)
}

/// A signed stream's bytes as received: (the signed part — every event through `[DONE]` —,
/// its signature, each event's data). Refuses a stream without a signature, or with a part that
/// is not a `data:` event.
pub fn split_stream(bytes: &[u8]) -> Result<(Vec<u8>, String, Vec<String>), TrustError> {
    let bad = |m: String| TrustError::BadRequest(m);
    let text = std::str::from_utf8(bytes).map_err(|_| bad("the stream is not UTF-8".into()))?;
    let at = text.rfind(STREAM_SIGNATURE_PREFIX).ok_or_else(|| bad("the stream carries no signature".into()))?;
    let (signed, tail) = text.split_at(at);
    let signature = tail[STREAM_SIGNATURE_PREFIX.len()..].trim().to_owned();
    let events = signed
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ").map(str::to_owned).ok_or_else(|| {
                let head: String = e.chars().take(40).collect();
                bad(format!("an event that is not `data:` ({head})"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((signed.as_bytes().to_vec(), signature, events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn attestation(nonce: [u8; 32]) -> (ServerAttestation, Identity, OpeningKey) {
        let signer = Identity::generate().unwrap();
        let opener = OpeningKey::generate().unwrap();
        let (model_blake3, binary_blake3) = ([3u8; 32], [4u8; 32]);
        let data = server_report_data(
            &signer.public().0,
            &opener.public().0,
            None,
            "m-r1",
            &model_blake3,
            &binary_blake3,
            &nonce,
        );
        let a = ServerAttestation {
            model: "m-r1".into(),
            model_blake3: hex::encode(model_blake3),
            binary_blake3: hex::encode(binary_blake3),
            signing_key: signer.public().hex(),
            sealing_key: hex::encode(opener.public().0),
            tls_spki_sha256: None,
            nonce: hex::encode(nonce),
            evidence: Evidence::insecure_dev(&data, "test"),
        };
        (a, signer, opener)
    }

    fn dev() -> AttestationPolicy {
        AttestationPolicy { allow_insecure_dev: true, ..Default::default() }
    }

    #[test]
    fn every_attested_field_is_bound_and_each_check_names_itself() {
        let nonce = [9u8; 32];
        let (a, ..) = attestation(nonce);
        let expected = Expected { nonce, model_blake3: Some(hex::encode([3u8; 32])), ..Default::default() };
        assert!(a.verify(&dev(), &expected, 0).unwrap().insecure);
        let e = |a: &ServerAttestation, x: &Expected, p: &AttestationPolicy| a.verify(p, x, 0).unwrap_err().to_string();
        assert!(e(&a, &Expected { nonce: [8; 32], ..expected.clone() }, &dev()).contains("nonce"));
        let other_model = Expected { model_blake3: Some(hex::encode([5u8; 32])), ..expected.clone() };
        assert!(e(&a, &other_model, &dev()).contains("weights"));
        let other_binary = Expected { binary_blake3: Some(hex::encode([5u8; 32])), ..expected.clone() };
        assert!(e(&a, &other_binary, &dev()).contains("binary"));
        let tls = Expected { tls_spki_sha256: Some([1; 32]), ..expected.clone() };
        assert!(e(&a, &tls, &dev()).contains("TLS"));
        assert!(e(&a, &expected, &AttestationPolicy::default()).contains("INSECURE"));
        // A server that claims other keys, weights, id, binary or nonce than its evidence binds.
        for tamper in 0..6 {
            let mut t = a.clone();
            let other = hex::encode([6u8; 32]);
            match tamper {
                0 => t.signing_key = Identity::generate().unwrap().public().hex(),
                1 => t.sealing_key = hex::encode(OpeningKey::generate().unwrap().public().0),
                2 => t.model = "alias".into(),
                3 => t.model_blake3 = other.clone(),
                4 => t.binary_blake3 = other.clone(),
                _ => t.tls_spki_sha256 = Some(other.clone()),
            }
            let x = Expected { nonce, ..Default::default() };
            assert!(e(&t, &x, &dev()).contains("report_data"), "tamper {tamper}");
        }
    }

    #[test]
    fn a_signature_covers_exactly_the_request_and_response_bytes_under_the_attested_key() {
        let signer = Identity::generate().unwrap();
        let (req, resp) = (b"{\"prompt\":\"hi\"}".to_vec(), b"{\"id\":\"cmpl-1\"}".to_vec());
        let s = ResponseSignature::sign(&signer, "cmpl-1", &blake3::hash(&req), &blake3::hash(&resp));
        s.verify(&signer.public(), "cmpl-1", &req, &resp).unwrap();
        for i in 0..resp.len() {
            let mut r = resp.clone();
            r[i] ^= 1;
            assert!(s.verify(&signer.public(), "cmpl-1", &req, &r).unwrap_err().to_string().contains("altered"));
        }
        let mut q = req.clone();
        q[0] ^= 1;
        assert!(s.verify(&signer.public(), "cmpl-1", &q, &resp).is_err());
        assert!(s.verify(&signer.public(), "cmpl-2", &req, &resp).is_err());
        let other = Identity::generate().unwrap().public();
        assert!(matches!(s.verify(&other, "cmpl-1", &req, &resp), Err(TrustError::BadSignature)));
    }

    #[test]
    fn a_stream_splits_into_its_signed_events_and_signature() {
        let (signed, sig, events) =
            split_stream(b"data: {\"a\":1}\n\ndata: [DONE]\n\n: tessera-signature ab12\n\n").unwrap();
        assert_eq!(signed, b"data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!((sig.as_str(), events), ("ab12", vec!["{\"a\":1}".to_owned(), "[DONE]".to_owned()]));
        assert!(split_stream(b"data: x\n\n").is_err(), "unsigned");
        assert!(split_stream(b"event: x\n\n: tessera-signature ab\n\n").is_err());
        assert!(split_stream(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn sealed_exchanges_open_only_for_their_party_request_and_position() {
        let server = OpeningKey::generate().unwrap();
        let client = OpeningKey::generate().unwrap();
        let sealed = seal_request(server.public(), client.public(), b"secret prompt").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(open_request(&server, client.public(), &sealed).unwrap(), b"secret prompt");
        // The response key is bound: a gateway cannot redirect the answer to its own key.
        let gateway = OpeningKey::generate().unwrap();
        assert!(open_request(&server, gateway.public(), &sealed).is_err());
        assert!(open_request(&gateway, client.public(), &sealed).is_err());
        let event1 = seal_response(client.public(), &sealed, 1, b"data").unwrap();
        assert_eq!(open_response(&client, &sealed, 1, &event1).unwrap(), b"data");
        assert!(open_response(&client, &sealed, 0, &event1).is_err(), "reordered");
        let other = seal_request(server.public(), client.public(), b"another").unwrap();
        assert!(open_response(&client, &other, 1, &event1).is_err(), "grafted onto another request");
        assert!(open_response(&gateway, &sealed, 1, &event1).is_err());
        for cut in 0..event1.len() {
            assert!(open_response(&client, &sealed, 1, &event1[..cut]).is_err());
        }
    }
}
