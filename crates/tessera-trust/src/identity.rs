//! Ed25519 identities: key files, signatures, and the signed-request scheme every contributor
//! request uses.
//!
//! A request is signed over its audience (the hub's key and the run's id), method, path,
//! timestamp, nonce and the BLAKE3 of its body ([`request_message`]); the hub checks the
//! signature, that the timestamp is within [`MAX_SKEW_MS`] of its clock, and that it never saw
//! the (key, nonce) pair before. The body's BLAKE3 also travels in [`CONTENT_HEADER`], so the
//! whole check runs on the headers ([`verify_request_head`]) before any body byte is read; the
//! body is then held to the hash it was signed with ([`SignedHead::check_body`]).

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::TrustError;

/// Headers of a signed request.
pub const KEY_HEADER: &str = "x-tessera-key";
pub const TIMESTAMP_HEADER: &str = "x-tessera-timestamp";
pub const NONCE_HEADER: &str = "x-tessera-nonce";
pub const SIGNATURE_HEADER: &str = "x-tessera-signature";
/// The BLAKE3 (hex) of a signed request's body, as signed.
pub const CONTENT_HEADER: &str = "x-tessera-content-blake3";
/// Header on the hub's signed answers: its signature over the body's BLAKE3.
pub const HUB_SIGNATURE_HEADER: &str = "x-tessera-hub-signature";

/// A request's timestamp may differ from the verifier's clock by at most this much.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// A public key, shown and sent as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn parse(hex_str: &str) -> Result<PublicKey, TrustError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut b)
            .map_err(|_| TrustError::BadKey("a public key is 64 hex digits".into()))?;
        // Also a point on the curve: a key nobody could sign for is refused here.
        VerifyingKey::from_bytes(&b).map_err(|_| TrustError::BadKey("not an Ed25519 public key".into()))?;
        Ok(PublicKey(b))
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Checks `signature` over `message` (strict: no malleable signatures, no weak keys).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), TrustError> {
        let key =
            VerifyingKey::from_bytes(&self.0).map_err(|_| TrustError::BadKey("not an Ed25519 public key".into()))?;
        let sig = Signature::from_slice(signature).map_err(|_| TrustError::BadSignature)?;
        key.verify_strict(message, &sig).map_err(|_| TrustError::BadSignature)
    }

    /// [`verify`](Self::verify) of a hex signature.
    pub fn verify_hex(&self, message: &[u8], signature_hex: &str) -> Result<(), TrustError> {
        let mut sig = [0u8; 64];
        hex::decode_to_slice(signature_hex, &mut sig).map_err(|_| TrustError::BadSignature)?;
        self.verify(message, &sig)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.hex())
    }
}

/// An Ed25519 signing key. Its `Debug` shows only the public half; the secret is wiped on drop.
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public())
    }
}

impl Identity {
    /// A fresh key from the operating system's randomness.
    pub fn generate() -> Result<Identity, TrustError> {
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).map_err(|e| TrustError::Random(e.to_string()))?;
        Ok(Identity { key: SigningKey::from_bytes(&secret) })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    pub fn sign_hex(&self, message: &[u8]) -> String {
        hex::encode(self.sign(message))
    }

    /// Writes the key as PKCS#8 PEM, readable by its owner only; refuses to overwrite.
    pub fn save(&self, path: &Path) -> Result<(), TrustError> {
        let pem = self
            .key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| TrustError::KeyFile { path: path.display().to_string(), message: e.to_string() })?;
        write_secret(path, pem.as_bytes())
    }

    /// Reads a key written by [`save`](Self::save). A key file others can read is refused.
    pub fn load(path: &Path) -> Result<Identity, TrustError> {
        let err = |message: String| TrustError::KeyFile { path: path.display().to_string(), message };
        check_owner_only(path)?;
        let pem = zeroize::Zeroizing::new(fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| err(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        Ok(Identity { key })
    }

    /// [`load`](Self::load) if the file exists, else a new key saved there.
    pub fn load_or_create(path: &Path) -> Result<Identity, TrustError> {
        if path.exists() {
            return Identity::load(path);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)
                .map_err(|e| TrustError::KeyFile { path: dir.display().to_string(), message: e.to_string() })?;
        }
        let id = Identity::generate()?;
        id.save(path)?;
        Ok(id)
    }

    /// The headers of a signed request to `audience`: `(name, value)` pairs.
    pub fn sign_request(
        &self,
        audience: &Audience,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<(&'static str, String)>, TrustError> {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).map_err(|e| TrustError::Random(e.to_string()))?;
        let nonce = hex::encode(nonce);
        let digest = blake3::hash(body).to_hex().to_string();
        let message = request_message(audience, method, path, now_ms, &nonce, &digest);
        Ok(vec![
            (KEY_HEADER, self.public().hex()),
            (TIMESTAMP_HEADER, now_ms.to_string()),
            (NONCE_HEADER, nonce),
            (SIGNATURE_HEADER, self.sign_hex(&message)),
            (CONTENT_HEADER, digest),
        ])
    }
}

/// Whom a signed request is for: one hub (its key) serving one run. A request signed for
/// another hub or another run does not verify here, so it cannot be replayed across them
/// (replicas of one run share both, and accept each other's requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub hub_key: PublicKey,
    /// The run's id (hex).
    pub run_id: String,
}

/// Writes `bytes` to a new file with mode 0600 (never overwriting one).
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    let err = |e: std::io::Error| TrustError::KeyFile { path: path.display().to_string(), message: e.to_string() };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Refuses a secret file that anyone but its owner may read or write.
pub fn check_owner_only(path: &Path) -> Result<(), TrustError> {
    let meta = fs::metadata(path)
        .map_err(|e| TrustError::KeyFile { path: path.display().to_string(), message: e.to_string() })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TrustError::KeyFile {
                path: path.display().to_string(),
                message: format!("permissions {mode:o} let others read it; run `chmod 600` on it"),
            });
        }
    }
    let _ = meta;
    Ok(())
}

/// The bytes a request signature covers; `body_blake3` is the body's BLAKE3 in hex.
pub fn request_message(
    audience: &Audience,
    method: &str,
    path: &str,
    timestamp_ms: i64,
    nonce: &str,
    body_blake3: &str,
) -> Vec<u8> {
    format!(
        "tessera-request-v2\n{}\n{}\n{}\n{path}\n{timestamp_ms}\n{nonce}\n{body_blake3}",
        audience.hub_key.hex(),
        audience.run_id,
        method.to_ascii_uppercase(),
    )
    .into_bytes()
}

/// The bytes the hub's signature over a published answer covers.
pub fn publication_message(body: &[u8]) -> Vec<u8> {
    publication_message_for(&blake3::hash(body).to_hex())
}

/// [`publication_message`] of a body whose BLAKE3 (hex) is known: a checkpoint, by its name.
pub fn publication_message_for(blake3_hex: &str) -> Vec<u8> {
    format!("tessera-hub-v1\n{blake3_hex}").into_bytes()
}

/// A verified request: who signed it and the nonce the verifier must not accept again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedBy {
    pub key: PublicKey,
    pub nonce: String,
    pub timestamp_ms: i64,
}

/// A request whose headers verified: who signed it, and the body it was signed with (still to
/// be read and checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHead {
    pub by: SignedBy,
    body_blake3: blake3::Hash,
}

impl SignedHead {
    /// The body is the one signed: its BLAKE3 is the signed one.
    pub fn check_body(&self, body: &[u8]) -> Result<(), TrustError> {
        self.check_hash(&blake3::hash(body))
    }

    /// As [`SignedHead::check_body`], for a body hashed as it streamed in.
    pub fn check_hash(&self, hash: &blake3::Hash) -> Result<(), TrustError> {
        // `blake3::Hash` compares in constant time.
        if *hash == self.body_blake3 {
            Ok(())
        } else {
            Err(TrustError::BadRequest("the body is not the one signed: its BLAKE3 differs from the signed one".into()))
        }
    }
}

/// Checks a signed request's headers (looked up by `header`) against its audience, method and
/// path at time `now_ms`, before any of its body is read. The caller still has to check the
/// nonce is new, and the body against [`SignedHead::check_body`].
pub fn verify_request_head<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    audience: &Audience,
    method: &str,
    path: &str,
    now_ms: i64,
) -> Result<SignedHead, TrustError> {
    let get = |name: &'static str| header(name).ok_or(TrustError::Unsigned(name));
    let key = PublicKey::parse(get(KEY_HEADER)?)?;
    let timestamp_ms: i64 = get(TIMESTAMP_HEADER)?
        .parse()
        .map_err(|_| TrustError::BadRequest("the timestamp is not milliseconds".into()))?;
    let nonce = get(NONCE_HEADER)?;
    if nonce.len() < 16 || nonce.len() > 64 || !nonce.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TrustError::BadRequest("the nonce must be 16 to 64 hex digits".into()));
    }
    let digest = get(CONTENT_HEADER)?;
    let body_blake3 = blake3::Hash::from_hex(digest)
        .map_err(|_| TrustError::BadRequest(format!("{CONTENT_HEADER} must be 64 hex digits")))?;
    // `abs_diff`: a timestamp at either end of i64's range cannot wrap the check.
    if timestamp_ms.abs_diff(now_ms) > MAX_SKEW_MS.unsigned_abs() {
        return Err(TrustError::Expired { timestamp_ms, now_ms });
    }
    let message = request_message(audience, method, path, timestamp_ms, nonce, &body_blake3.to_hex());
    key.verify_hex(&message, get(SIGNATURE_HEADER)?)?;
    Ok(SignedHead { by: SignedBy { key, nonce: nonce.to_ascii_lowercase(), timestamp_ms }, body_blake3 })
}

/// Checks a whole signed request: [`verify_request_head`], then its `body`.
pub fn verify_request<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
    audience: &Audience,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: i64,
) -> Result<SignedBy, TrustError> {
    let head = verify_request_head(header, audience, method, path, now_ms)?;
    head.check_body(body)?;
    Ok(head.by)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn audience() -> Audience {
        Audience { hub_key: PublicKey([3; 32]), run_id: "0123456789abcdef0123456789abcdef".into() }
    }

    fn check(
        h: &[(&'static str, String)],
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
    ) -> Result<SignedBy, TrustError> {
        check_for(&audience(), h, method, path, body, now)
    }

    fn check_for(
        audience: &Audience,
        h: &[(&'static str, String)],
        method: &str,
        path: &str,
        body: &[u8],
        now: i64,
    ) -> Result<SignedBy, TrustError> {
        let map: HashMap<&str, &str> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        verify_request(|n| map.get(n).copied(), audience, method, path, body, now)
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_to_it_does_not() {
        let id = Identity::generate().unwrap();
        let h = id.sign_request(&audience(), "POST", "/v1/submissions", b"body", 1_000_000).unwrap();
        assert_eq!(check(&h, "POST", "/v1/submissions", b"body", 1_000_000).unwrap().key, id.public());
        assert!(matches!(check(&h, "POST", "/v1/submissions", b"bodY", 1_000_000), Err(TrustError::BadRequest(_))));
        // Another hub, or another run on the same hub, does not accept it.
        let other_hub = Audience { hub_key: PublicKey([4; 32]), ..audience() };
        let other_run = Audience { run_id: "fedcba9876543210fedcba9876543210".into(), ..audience() };
        for other in [other_hub, other_run] {
            let checked = check_for(&other, &h, "POST", "/v1/submissions", b"body", 1_000_000);
            assert!(matches!(checked, Err(TrustError::BadSignature)), "{other:?}: {checked:?}");
        }
        // The signed body hash travels in a header: changing it breaks the signature, and a
        // body that does not match it is refused.
        let mut digest = h.clone();
        digest[4].1 = blake3::hash(b"bodY").to_hex().to_string();
        assert!(matches!(check(&digest, "POST", "/v1/submissions", b"bodY", 1_000_000), Err(TrustError::BadSignature)));
        assert!(matches!(check(&h, "GET", "/v1/submissions", b"body", 1_000_000), Err(TrustError::BadSignature)));
        assert!(matches!(check(&h, "POST", "/v1/assignments", b"body", 1_000_000), Err(TrustError::BadSignature)));
        assert!(matches!(
            check(&h, "POST", "/v1/submissions", b"body", 1_000_000 + MAX_SKEW_MS + 1),
            Err(TrustError::Expired { .. })
        ));
        // Another key claiming the signature.
        let mut forged = h.clone();
        forged[0].1 = Identity::generate().unwrap().public().hex();
        assert!(matches!(check(&forged, "POST", "/v1/submissions", b"body", 1_000_000), Err(TrustError::BadSignature)));
        // A changed timestamp or nonce breaks the signature too.
        let mut later = h.clone();
        later[1].1 = "1000001".into();
        assert!(matches!(check(&later, "POST", "/v1/submissions", b"body", 1_000_000), Err(TrustError::BadSignature)));
        let mut missing = h.clone();
        missing.remove(3);
        assert!(matches!(check(&missing, "POST", "/v1/submissions", b"body", 1_000_000), Err(TrustError::Unsigned(_))));
    }

    /// A validly signed request from the far ends of time is expired: the skew check must not
    /// wrap (`i64::MIN - now` overflows, and its absolute value is negative in a release build).
    #[test]
    fn timestamps_at_the_ends_of_the_range_are_expired() {
        let id = Identity::generate().unwrap();
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let h = id.sign_request(&audience(), "POST", "/v1/submissions", b"body", ts).unwrap();
            for now in [0, 1_000_000, 1_800_000_000_000] {
                let checked = check(&h, "POST", "/v1/submissions", b"body", now);
                assert!(matches!(checked, Err(TrustError::Expired { .. })), "{ts} at {now}: {checked:?}");
            }
        }
    }

    #[test]
    fn key_files_are_owner_only_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let id = Identity::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(Identity::load(&path).unwrap_err().to_string().contains("chmod 600"));
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert_eq!(Identity::load(&path).unwrap().public(), id.public());
        assert!(id.save(&path).is_err(), "never overwrites a key");
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    proptest::proptest! {
        #[test]
        fn hostile_headers_are_refused_without_panic(key in ".{0,80}", ts in ".{0,24}", nonce in ".{0,80}", sig in ".{0,140}", digest in ".{0,80}") {
            let h = vec![(KEY_HEADER, key), (TIMESTAMP_HEADER, ts), (NONCE_HEADER, nonce), (SIGNATURE_HEADER, sig), (CONTENT_HEADER, digest)];
            proptest::prop_assert!(check(&h, "POST", "/", b"", 0).is_err());
        }
    }
}
