//! Pseudo-gradients sealed to the validator with HPKE (RFC 9180, base mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305).
//!
//! ```text
//! offset  size  field
//!      0     6  magic "TSEAL2"
//!      6    16  run id
//!     22     8  base round (u64 LE)
//!     30    32  base checkpoint (BLAKE3)
//!     62    32  contributor's Ed25519 public key
//!     94    32  BLAKE3 of the validator's HPKE public key it is sealed to
//!    126    32  HPKE encapsulated key
//!    158     …  ciphertext: the pseudo-gradient message, then a 16-byte tag
//!   end-64   64  the contributor's Ed25519 signature over
//!                "tessera-seal-v2\n" ‖ BLAKE3(everything before it)
//! ```
//!
//! Bytes 0..126 are the header. The hub reads it in the clear to check the run, the base and the
//! sender, and it is the AEAD's associated data: changing any of it (claiming someone else's
//! ciphertext as one's own, say) makes the envelope fail to open. The signature makes the
//! contributor, not whoever delivers the envelope, its author: anyone can seal a message to the
//! validator's public key, so without it the hub could forge a submission "from" any key.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};

use crate::{PublicKey, TrustError};

type Kem = X25519HkdfSha256;

pub const MAGIC: &[u8; 6] = b"TSEAL2";
pub const HEADER_LEN: usize = 126;
const ENC_LEN: usize = 32;
const TAG_LEN: usize = 16;
const SIG_LEN: usize = 64;
/// HPKE `info`: binds the key schedule to this use.
const INFO: &[u8] = b"tessera/v1/pseudo-gradient";

/// An envelope's clear header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    pub run_id: [u8; 16],
    pub base_round: u64,
    pub base_checkpoint: [u8; 32],
    pub contributor: PublicKey,
    /// BLAKE3 of the validator's HPKE public key.
    pub recipient: [u8; 32],
}

impl SealedHeader {
    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..6].copy_from_slice(MAGIC);
        b[6..22].copy_from_slice(&self.run_id);
        b[22..30].copy_from_slice(&self.base_round.to_le_bytes());
        b[30..62].copy_from_slice(&self.base_checkpoint);
        b[62..94].copy_from_slice(&self.contributor.0);
        b[94..126].copy_from_slice(&self.recipient);
        b
    }

    /// Parses the header of an envelope (which must be at least header, key, tag and
    /// signature long). The signature is not checked here: see [`SealedHeader::verified`].
    pub fn parse(envelope: &[u8]) -> Result<SealedHeader, TrustError> {
        let bad = |m: &str| TrustError::Envelope(m.to_owned());
        if envelope.len() < HEADER_LEN + ENC_LEN + TAG_LEN + SIG_LEN {
            return Err(bad("shorter than an envelope's header, key, tag and signature"));
        }
        if &envelope[..6] != MAGIC {
            return Err(bad("not a sealed submission (bad magic)"));
        }
        fn arr<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
            let mut out = [0u8; N];
            out.copy_from_slice(&b[at..at + N]);
            out
        }
        Ok(SealedHeader {
            run_id: arr(envelope, 6),
            base_round: u64::from_le_bytes(arr(envelope, 22)),
            base_checkpoint: arr(envelope, 30),
            contributor: PublicKey(arr(envelope, 62)),
            recipient: arr(envelope, 94),
        })
    }

    /// Parses the header of an envelope and checks that the contributor it names signed the
    /// whole envelope.
    pub fn verified(envelope: &[u8]) -> Result<SealedHeader, TrustError> {
        let header = SealedHeader::parse(envelope)?;
        let (signed, signature) = envelope.split_at(envelope.len() - SIG_LEN);
        header
            .contributor
            .verify(&seal_message(signed), signature)
            .map_err(|_| TrustError::Envelope("not signed by the contributor it names".into()))?;
        Ok(header)
    }
}

/// What a contributor's signature over its envelope covers.
fn seal_message(signed: &[u8]) -> Vec<u8> {
    let mut m = b"tessera-seal-v2\n".to_vec();
    m.extend_from_slice(blake3::hash(signed).as_bytes());
    m
}

/// The validator's HPKE public key, as sent and attested.
#[derive(Clone, PartialEq, Eq)]
pub struct SealingKey(pub [u8; 32]);

impl SealingKey {
    pub fn fingerprint(&self) -> [u8; 32] {
        *blake3::hash(&self.0).as_bytes()
    }

    pub fn parse(hex_str: &str) -> Result<SealingKey, TrustError> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut b).map_err(|_| TrustError::BadKey("an HPKE key is 64 hex digits".into()))?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&b).map_err(|_| TrustError::BadKey("not an X25519 key".into()))?;
        Ok(SealingKey(b))
    }

    /// Seals `message` from `contributor`, who signs the envelope (the header's contributor
    /// and recipient are set to it and to this key).
    pub fn seal(
        &self,
        mut header: SealedHeader,
        message: &[u8],
        contributor: &crate::Identity,
    ) -> Result<Vec<u8>, TrustError> {
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&self.0)
            .map_err(|_| TrustError::BadKey("not an X25519 key".into()))?;
        header.recipient = self.fingerprint();
        header.contributor = contributor.public();
        let aad = header.to_bytes();
        let (enc, ct) =
            hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(&OpModeS::Base, &pk, INFO, message, &aad)
                .map_err(|e| TrustError::Envelope(format!("sealing failed: {e}")))?;
        let mut out = Vec::with_capacity(HEADER_LEN + ENC_LEN + ct.len() + SIG_LEN);
        out.extend_from_slice(&aad);
        out.extend_from_slice(&enc.to_bytes());
        out.extend_from_slice(&ct);
        let signature = contributor.sign(&seal_message(&out));
        out.extend_from_slice(&signature);
        Ok(out)
    }
}

/// HPKE base-mode single-shot seal of `message` to `recipient` under `info` and `aad`:
/// the encapsulated key (32 bytes) then the ciphertext and its tag.
pub(crate) fn seal_raw(recipient: &[u8; 32], info: &[u8], aad: &[u8], message: &[u8]) -> Result<Vec<u8>, TrustError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient)
        .map_err(|_| TrustError::BadKey("not an X25519 key".into()))?;
    let (enc, ct) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem>(&OpModeS::Base, &pk, info, message, aad)
            .map_err(|e| TrustError::Envelope(format!("sealing failed: {e}")))?;
    let mut out = Vec::with_capacity(ENC_LEN + ct.len());
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&ct);
    Ok(out)
}

/// The validator's HPKE private key (created in the TEE, never written out).
pub struct OpeningKey {
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: SealingKey,
}

impl OpeningKey {
    pub fn generate() -> Result<OpeningKey, TrustError> {
        let mut ikm = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(ikm.as_mut()).map_err(|e| TrustError::Random(e.to_string()))?;
        let (sk, pk) = Kem::derive_keypair(ikm.as_ref());
        let mut b = [0u8; 32];
        b.copy_from_slice(&pk.to_bytes());
        Ok(OpeningKey { sk, pk: SealingKey(b) })
    }

    pub fn public(&self) -> &SealingKey {
        &self.pk
    }

    /// Opens what [`seal_raw`] sealed to this key under the same `info` and `aad`.
    pub(crate) fn open_raw(&self, info: &[u8], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, TrustError> {
        if sealed.len() < ENC_LEN + TAG_LEN {
            return Err(TrustError::Envelope("shorter than an encapsulated key and a tag".into()));
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed[..ENC_LEN])
            .map_err(|_| TrustError::Envelope("bad encapsulated key".into()))?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.sk,
            &enc,
            info,
            &sealed[ENC_LEN..],
            aad,
        )
        .map_err(|_| TrustError::Envelope("does not open: altered, or not sealed to this key".into()))
    }

    /// Opens an envelope sealed to this key: its header and the message inside.
    /// Its contributor's signature is checked first.
    pub fn open(&self, envelope: &[u8]) -> Result<(SealedHeader, Vec<u8>), TrustError> {
        let header = SealedHeader::verified(envelope)?;
        if header.recipient != self.pk.fingerprint() {
            return Err(TrustError::Envelope("sealed to another validator key".into()));
        }
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&envelope[HEADER_LEN..HEADER_LEN + ENC_LEN])
            .map_err(|_| TrustError::Envelope("bad encapsulated key".into()))?;
        let message = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeR::Base,
            &self.sk,
            &enc,
            INFO,
            &envelope[HEADER_LEN + ENC_LEN..envelope.len() - SIG_LEN],
            &envelope[..HEADER_LEN],
        )
        .map_err(|_| TrustError::Envelope("does not open: altered, or not sealed to this key".into()))?;
        Ok((header, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn header() -> SealedHeader {
        SealedHeader {
            run_id: [7; 16],
            base_round: 3,
            base_checkpoint: [9; 32],
            contributor: Identity::generate().unwrap().public(),
            recipient: [0; 32],
        }
    }

    #[test]
    fn only_the_validator_opens_and_nothing_can_be_changed() {
        let key = OpeningKey::generate().unwrap();
        let me = Identity::generate().unwrap();
        let h = SealedHeader { contributor: me.public(), ..header() };
        let sealed = key.public().seal(h.clone(), b"a pseudo-gradient", &me).unwrap();
        assert!(!sealed.windows(17).any(|w| w == b"a pseudo-gradient"), "no plaintext in the envelope");
        let (got, msg) = key.open(&sealed).unwrap();
        assert_eq!(msg, b"a pseudo-gradient");
        assert_eq!(got.contributor, h.contributor);
        assert!(OpeningKey::generate().unwrap().open(&sealed).is_err(), "another key cannot open it");
        // Every single-byte change is refused: header (associated data), key, ciphertext or
        // signature.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert!(key.open(&t).is_err(), "byte {i}");
        }
        // Claiming someone else's envelope as one's own.
        let mut stolen = sealed.clone();
        stolen[62..94].copy_from_slice(&Identity::generate().unwrap().public().0);
        assert!(key.open(&stolen).is_err());
    }

    /// Anyone can seal to the validator's public key (the hub included), but an envelope
    /// "from" a contributor who did not sign it does not open (before, it did: nothing but the
    /// clear header named the sender).
    #[test]
    fn an_envelope_from_someone_else_is_refused() {
        let key = OpeningKey::generate().unwrap();
        let victim = Identity::generate().unwrap();
        let forger = Identity::generate().unwrap();
        let sealed = key.public().seal(header(), b"poison", &forger).unwrap();
        // The forger re-labels it as the victim's and re-signs what it can.
        let mut forged = sealed.clone();
        forged[62..94].copy_from_slice(&victim.public().0);
        assert!(SealedHeader::verified(&forged).is_err());
        assert!(key.open(&forged).is_err());
        // Or re-seals under the victim's name with its own signature.
        let mut h = header();
        h.contributor = victim.public();
        let resealed = key.public().seal(h, b"poison", &forger).unwrap();
        assert_eq!(SealedHeader::parse(&resealed).unwrap().contributor, forger.public(), "seal names its signer");
        assert!(SealedHeader::verified(&sealed).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn hostile_envelopes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let key = OpeningKey::generate().unwrap();
            let _ = SealedHeader::parse(&bytes);
            proptest::prop_assert!(key.open(&bytes).is_err());
        }
    }
}
