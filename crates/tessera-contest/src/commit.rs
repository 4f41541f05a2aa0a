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

/// A revealed seed checked against its commitment, both as hex (what the API carries): the
/// seed's bytes, or why they are not the ones committed to.
pub fn verify_hex(commitment_hex: &str, seed_hex: &str) -> Result<[u8; 32], String> {
    let (mut seed, mut c) = ([0u8; 32], [0u8; 32]);
    hex::decode_to_slice(seed_hex, &mut seed).map_err(|e| format!("seed: {e}"))?;
    hex::decode_to_slice(commitment_hex, &mut c).map_err(|e| format!("commitment: {e}"))?;
    if !verify(&c, &seed) {
        return Err("the revealed evaluation seed does not match its commitment".into());
    }
    Ok(seed)
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
        assert_eq!(verify_hex(&hex::encode(c), &hex::encode(s)), Ok(s));
        assert!(verify_hex(&hex::encode(c), &hex::encode(t)).unwrap_err().contains("does not match"));
        assert!(verify_hex(&hex::encode(c), "zz").unwrap_err().starts_with("seed"));
    }
}
