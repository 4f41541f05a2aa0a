//! The client side of attested serving: what `tessera verify-serve` runs.
//!
//! 1. Fetch `/v1/attestation/report` with a fresh random nonce, over TLS accepting the
//!    server's self-signed certificate for now but recording its key.
//! 2. Check the report ([`ServerAttestation::verify`]): the nonce, the expected weights and
//!    binary, that the TLS key is the attested one, and the TEE evidence under a policy.
//! 3. Only then send completions, each checked against the attested keys: the response
//!    signature over the exact request and response bytes, the same signature served by
//!    `/v1/signature/{id}`, the TLS key again on every response, and — sealed — requests only
//!    the attested key opens and responses only this client opens.

use serde_json::Value;
use tessera_trust::serving::{self, Expected, ResponseSignature, ServerAttestation};
use tessera_trust::{AttestationPolicy, OpeningKey, PublicKey, SealingKey, Verified};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Http(String),
    #[error("the server's answer is malformed: {0}")]
    Malformed(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Trust(#[from] tessera_trust::TrustError),
}

/// A connection to an attested server whose attestation was checked.
pub struct Verifier {
    http: reqwest::Client,
    base: String,
    api_key: String,
    pub attestation: ServerAttestation,
    pub verified: Verified,
    signing_key: PublicKey,
    sealing_key: SealingKey,
    spki: Option<[u8; 32]>,
}

/// One checked completion.
#[derive(Debug)]
pub struct Checked {
    pub id: String,
    /// The response's JSON body (opened, if sealed); for a stream, each event's data.
    pub events: Vec<String>,
    /// The bytes the signature covers, as received.
    pub response_bytes: usize,
}

fn http_error(e: reqwest::Error) -> VerifyError {
    VerifyError::Http(format!("{e}"))
}

fn peer_spki(response: &reqwest::Response) -> Result<Option<[u8; 32]>, VerifyError> {
    match response.extensions().get::<reqwest::tls::TlsInfo>().and_then(|t| t.peer_certificate()) {
        Some(der) => Ok(Some(crate::attested::spki_sha256(der).map_err(|e| VerifyError::Malformed(e.to_string()))?)),
        None => Ok(None),
    }
}

impl Verifier {
    /// Checks `base`'s attestation under `policy` at `now_secs` (Unix time), expecting the given
    /// weights and binary when named.
    pub async fn connect(
        base: &str,
        api_key: &str,
        policy: &AttestationPolicy,
        model_blake3: Option<String>,
        binary_blake3: Option<String>,
        now_secs: u64,
    ) -> Result<Verifier, VerifyError> {
        let base = base.trim_end_matches('/').to_owned();
        // The certificate is self-signed: it is trusted because the attestation binds its key,
        // which is checked below before anything secret is sent.
        let http = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .tls_info(true)
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .map_err(http_error)?;
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| VerifyError::Http(format!("no OS randomness: {e}")))?;
        let response = http
            .get(format!("{base}/v1/attestation/report?nonce={}", hex::encode(nonce)))
            .send()
            .await
            .map_err(http_error)?;
        let spki = peer_spki(&response)?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(VerifyError::Refused(format!("the attestation report answered {status}: {text}")));
        }
        let attestation: ServerAttestation =
            response.json().await.map_err(|e| VerifyError::Malformed(format!("attestation report: {e}")))?;
        let expected = Expected { nonce, model_blake3, binary_blake3, tls_spki_sha256: spki };
        let verified = attestation.verify(policy, &expected, now_secs)?;
        let (signing_key, sealing_key) = attestation.keys()?;
        Ok(Verifier { http, base, api_key: api_key.to_owned(), attestation, verified, signing_key, sealing_key, spki })
    }

    /// Whether the connection is TLS (and its key is the attested one).
    pub fn tls(&self) -> bool {
        self.spki.is_some()
    }

    fn check_tls(&self, response: &reqwest::Response) -> Result<(), VerifyError> {
        if peer_spki(response)? != self.spki {
            return Err(VerifyError::Refused("the TLS certificate's key changed after attestation".into()));
        }
        Ok(())
    }

    /// Sends `body` to `path` (`/v1/completions` or `/v1/chat/completions`), sealed or not,
    /// streamed if the body asks, in strict mode, and checks the answer's signature and the one
    /// `/v1/signature/{id}` serves.
    pub async fn complete(&self, path: &str, body: &Value, sealed: bool) -> Result<Checked, VerifyError> {
        let plain = serde_json::to_vec(body).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        // A one-time key for the answer, when sealed.
        let client = if sealed { Some(OpeningKey::generate()?) } else { None };
        let wire = match &client {
            Some(c) => serving::seal_request(&self.sealing_key, c.public(), &plain)?,
            None => plain,
        };
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.api_key)
            .header(serving::STRICT_HEADER, "1")
            .body(wire.clone());
        let request = match &client {
            Some(c) => request
                .header(serving::SEAL_TO_HEADER, hex::encode(c.public().0))
                .header("content-type", serving::SEALED_CONTENT_TYPE),
            None => request.header("content-type", "application/json"),
        };
        let response = request.send().await.map_err(http_error)?;
        self.check_tls(&response)?;
        let status = response.status();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (id, signature_header) = (header(serving::RESPONSE_ID_HEADER), header(serving::SIGNATURE_HEADER));
        let streamed = header("content-type").is_some_and(|c| c.starts_with("text/event-stream"));
        let bytes = response.bytes().await.map_err(http_error)?.to_vec();
        let open = |index: u64, data: &[u8]| -> Result<Vec<u8>, VerifyError> {
            match &client {
                Some(c) => Ok(serving::open_response(c, &wire, index, data)?),
                None => Ok(data.to_vec()),
            }
        };
        if !status.is_success() {
            let text = open(0, &bytes).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            return Err(VerifyError::Http(format!("{path} answered {status}: {text}")));
        }
        let id = id.ok_or_else(|| VerifyError::Refused(format!("no {} header", serving::RESPONSE_ID_HEADER)))?;
        let (signed, signature, events) = if streamed {
            let (signed, signature, events) = serving::split_stream(&bytes)?;
            let mut opened = Vec::with_capacity(events.len());
            for (i, data) in events.iter().enumerate() {
                let data = if sealed {
                    open(i as u64, &hex::decode(data).map_err(|_| VerifyError::Malformed("a sealed event".into()))?)?
                } else {
                    data.as_bytes().to_vec()
                };
                opened.push(String::from_utf8(data).map_err(|_| VerifyError::Malformed("an event".into()))?);
            }
            if opened.last().map(String::as_str) != Some("[DONE]") {
                return Err(VerifyError::Refused("the stream was cut before [DONE]".into()));
            }
            (signed, signature, opened)
        } else {
            let opened = String::from_utf8(open(0, &bytes)?).map_err(|_| VerifyError::Malformed("the body".into()))?;
            let signature = signature_header
                .ok_or_else(|| VerifyError::Refused(format!("no {} header", serving::SIGNATURE_HEADER)))?;
            (bytes.clone(), signature, vec![opened])
        };
        let kept = self.signature(&id).await?;
        if kept.signature != signature {
            return Err(VerifyError::Refused("the signature served for this id is not the response's".into()));
        }
        kept.verify(&self.signing_key, &id, &wire, &signed)?;
        Ok(Checked { id, events, response_bytes: signed.len() })
    }

    /// The signature `/v1/signature/{id}` serves.
    pub async fn signature(&self, id: &str) -> Result<ResponseSignature, VerifyError> {
        let response = self
            .http
            .get(format!("{}/v1/signature/{id}", self.base))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .map_err(http_error)?;
        self.check_tls(&response)?;
        if !response.status().is_success() {
            return Err(VerifyError::Refused(format!("/v1/signature/{id} answered {}", response.status())));
        }
        response.json().await.map_err(|e| VerifyError::Malformed(format!("signature: {e}")))
    }
}
