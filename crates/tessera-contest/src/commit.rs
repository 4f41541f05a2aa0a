//! Commit–reveal of a round's evaluation seed. The hub draws 32 random bytes when a round opens
//! and publishes only their commitment; once the round's submissions close it reveals the seed,
//! and anyone can check it against the commitment before trusting the evaluation data it picks.

const DOMAIN: &str = "tessera 2026 evaluation seed commitment v1";

/// The public commitment to `seed`.
pub fn commitment(seed: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(DOMAIN, seed)
}

/// Whether `seed` is the one `commitment` was made to.
pub fn verify(commitment_bytes: &[u8; 32], seed: &[u8; 32]) -> bool {
    // Not secret-dependent in any way an attacker could use: both values are public by now.
    commitment(seed) == *commitment_bytes
}

/// A 64-bit RNG seed for one purpose (`what`) derived from the revealed seed.
pub fn derive(seed: &[u8; 32], what: &str) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("tessera 2026 evaluation seed use v1");
    h.update(seed);
    h.update(what.as_bytes());
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commitments_bind() {
        let s = [7u8; 32];
        let c = commitment(&s);
        assert!(verify(&c, &s));
        let mut t = s;
        t[31] ^= 1;
        assert!(!verify(&c, &t));
        assert_ne!(derive(&s, "eval"), derive(&s, "random"));
        assert_ne!(derive(&s, "eval"), derive(&t, "eval"));
    }
}
