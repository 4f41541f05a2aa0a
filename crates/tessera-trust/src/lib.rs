//! Trust: who sent what, and who may read it.
//!
//! - [`identity`]: Ed25519 identities, key files (owner-only), signed requests with a nonce and a
//!   timestamp, and the hub's signature on what it publishes.
//! - [`envelope`]: pseudo-gradients sealed with HPKE to the validator's attested key; the hub
//!   reads only the header.
//! - [`attest`]: SEV-SNP and TDX evidence checked with the vendors' crates, plus the policy they
//!   leave to us; the INSECURE software attester for development.
//! - [`serving`]: what `tessera serve --tee` attests (keys, weights, binary, a client's nonce),
//!   its signatures over exact request and response bytes, and requests sealed end to end.
//! - [`tee`]: where evidence comes from: the kernel's configfs-tsm in a SEV-SNP or TDX guest,
//!   or the INSECURE development stand-in.
//! - [`ledger`]: the append-only, hash-chained, Merkle-committed record of receipts, emissions,
//!   usage and payouts, and its verifier.
//!
//! No libtorch, no I/O beyond key files and configfs-tsm, no clock: callers pass the time.

pub mod attest;
pub mod envelope;
pub mod identity;
pub mod ledger;
pub mod serving;
pub mod tee;

pub use attest::{AttestationPolicy, Evidence, ValidatorAttestation, Verified, report_data};
pub use envelope::{OpeningKey, SealedHeader, SealingKey};
pub use identity::{Audience, Identity, PublicKey, SignedBy, SignedHead, verify_request, verify_request_head};

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("the signature does not verify")]
    BadSignature,
    #[error("unsigned request: missing the `{0}` header (sign it with `tessera keygen`'s key)")]
    Unsigned(&'static str),
    #[error("bad signed request: {0}")]
    BadRequest(String),
    #[error(
        "request timestamp {timestamp_ms} is more than 5 minutes from the verifier's clock ({now_ms}); check the clock"
    )]
    Expired { timestamp_ms: i64, now_ms: i64 },
    #[error("key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    #[error("sealed submission: {0}")]
    Envelope(String),
    #[error("{kind} attestation refused: {reason}")]
    Attestation { kind: &'static str, reason: String },
    #[error("ledger: {0}")]
    Ledger(#[from] ledger::LedgerError),
}
