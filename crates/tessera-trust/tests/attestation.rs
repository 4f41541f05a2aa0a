//! Attestation verification on genuine vendor evidence: an AMD SEV-SNP report from a Milan
//! machine with its VCEK (from the `sev` crate's tests, Apache-2.0) and Intel TDX quotes with
//! their DCAP collateral (from the `dcap-qvl` crate's samples, MIT; see `testdata/LICENSE.*`).

use tessera_trust::{AttestationPolicy, Evidence, TrustError, attest};

const MILAN_REPORT_HEX: &str = include_str!("../testdata/report_milan.hex");
const MILAN_VCEK: &[u8] = include_bytes!("../testdata/vcek_milan.der");
const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote.bin");
const TDX_COLLATERAL: &str = include_str!("../testdata/tdx_quote_collateral.json");
const TDX_OUTDATED: &[u8] = include_bytes!("../testdata/tdx_quote_outdated.bin");
const TDX_OUTDATED_COLLATERAL: &str = include_str!("../testdata/tdx_quote_outdated_collateral.json");

/// 2025-07-01T00:00:00Z: inside the TDX sample collateral's validity (issued 2025-06-19,
/// next update 2025-07-19).
const TDX_NOW: u64 = 1_751_328_000;
const MARCH_2026: u64 = 1_772_323_200; // 2026-03-01, inside the outdated sample's window

fn milan() -> Vec<u8> {
    hex::decode(MILAN_REPORT_HEX.trim()).unwrap()
}

/// Fields of the Milan sample, read at their documented offsets (AMD SEV-SNP ABI, table 22).
fn milan_measurement() -> String {
    hex::encode(&milan()[0x90..0xC0])
}

fn milan_report_data() -> [u8; 64] {
    milan()[0x50..0x90].try_into().unwrap()
}

fn sev(report: &[u8], vcek: &[u8]) -> Evidence {
    Evidence::SevSnp { report: hex::encode(report), vcek: hex::encode(vcek) }
}

fn sev_policy() -> AttestationPolicy {
    AttestationPolicy { sev_snp_measurements: vec![milan_measurement()], ..Default::default() }
}

fn refused(r: Result<attest::Verified, TrustError>) -> String {
    match r {
        Err(e @ TrustError::Attestation { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_genuine_milan_report_verifies_under_a_policy_pinning_its_measurement() {
    let v = attest::verify(&sev(&milan(), MILAN_VCEK), &sev_policy(), &milan_report_data(), 0).unwrap();
    assert_eq!(v.kind, "sev-snp");
    assert_eq!(v.measurement, milan_measurement());
    assert!(!v.insecure);
    assert!(v.tcb.contains("Milan"), "{}", v.tcb);
}

#[test]
fn a_tampered_or_unexpected_milan_report_is_refused_with_its_reason() {
    let expected = milan_report_data();
    // A flipped bit anywhere in the signed part of the report breaks its signature (the
    // signature itself starts at 0x2A0).
    for byte in [0x00, 0x08, 0x15, 0x50, 0x90, 0x1A0, 0x29F] {
        let mut r = milan();
        r[byte] ^= 0x01;
        let e = refused(attest::verify(&sev(&r, MILAN_VCEK), &sev_policy(), &expected, 0));
        assert!(e.contains("signature") || e.contains("report"), "byte {byte:#x}: {e}");
    }
    // A VCEK with a flipped bit no longer chains to AMD's root.
    let mut vcek = MILAN_VCEK.to_vec();
    vcek[40] ^= 0xff;
    let e = refused(attest::verify(&sev(&milan(), &vcek), &sev_policy(), &expected, 0));
    assert!(e.contains("VCEK"), "{e}");
    // A measurement the run does not pin.
    let other = AttestationPolicy { sev_snp_measurements: vec!["00".repeat(48)], ..Default::default() };
    assert!(refused(attest::verify(&sev(&milan(), MILAN_VCEK), &other, &expected, 0)).contains("measurement"));
    // A report that does not commit to the keys it is presented with.
    let mut keys = expected;
    keys[0] ^= 1;
    assert!(refused(attest::verify(&sev(&milan(), MILAN_VCEK), &sev_policy(), &keys, 0)).contains("report_data"));
    // Not hex, not a report, not a certificate.
    let junk = Evidence::SevSnp { report: "zz".into(), vcek: hex::encode(MILAN_VCEK) };
    assert!(refused(attest::verify(&junk, &sev_policy(), &expected, 0)).contains("hex"));
    refused(attest::verify(&sev(&milan()[..100], MILAN_VCEK), &sev_policy(), &expected, 0));
    refused(attest::verify(&sev(&milan(), &MILAN_VCEK[..200]), &sev_policy(), &expected, 0));
}

fn tdx(quote: &[u8], collateral: &str) -> Evidence {
    Evidence::Tdx { quote: hex::encode(quote), collateral: serde_json::from_str(collateral).unwrap() }
}

/// The TD report inside a TDX v4 quote: after the 48-byte header; MRTD at 136, report data at 520.
fn td_field(quote: &[u8], offset: usize, len: usize) -> Vec<u8> {
    quote[48 + offset..48 + offset + len].to_vec()
}

fn tdx_policy(quote: &[u8]) -> AttestationPolicy {
    AttestationPolicy { tdx_mrtds: vec![hex::encode(td_field(quote, 136, 48))], ..Default::default() }
}

fn tdx_report_data(quote: &[u8]) -> [u8; 64] {
    td_field(quote, 520, 64).try_into().unwrap()
}

#[test]
fn a_genuine_tdx_quote_verifies_at_a_time_its_collateral_is_valid() {
    let v =
        attest::verify(&tdx(TDX_QUOTE, TDX_COLLATERAL), &tdx_policy(TDX_QUOTE), &tdx_report_data(TDX_QUOTE), TDX_NOW)
            .unwrap();
    assert_eq!(v.kind, "tdx");
    assert_eq!(v.tcb, "UpToDate");
    assert!(!v.insecure);
}

#[test]
fn a_tampered_stale_or_unexpected_tdx_quote_is_refused_with_its_reason() {
    let (policy, expected) = (tdx_policy(TDX_QUOTE), tdx_report_data(TDX_QUOTE));
    let ok = |q: &[u8], c: &str, p: &AttestationPolicy, e: &[u8; 64], t| attest::verify(&tdx(q, c), p, e, t);
    // Collateral outside its validity window, either side.
    for t in [TDX_NOW - 40 * 86_400, TDX_NOW + 40 * 86_400] {
        let e = refused(ok(TDX_QUOTE, TDX_COLLATERAL, &policy, &expected, t));
        let l = e.to_lowercase();
        assert!(l.contains("expired") || l.contains("future") || l.contains("valid"), "{e}");
    }
    // A flipped bit in the TD report (MRTD, report data) or in the quote's signature.
    for byte in [48 + 136, 48 + 520, 48 + 584 + 10] {
        let mut q = TDX_QUOTE.to_vec();
        q[byte] ^= 0x01;
        refused(ok(&q, TDX_COLLATERAL, &policy, &expected, TDX_NOW));
    }
    // A measurement the run does not pin; report data for other keys.
    let other = AttestationPolicy { tdx_mrtds: vec!["11".repeat(48)], ..Default::default() };
    assert!(refused(ok(TDX_QUOTE, TDX_COLLATERAL, &other, &expected, TDX_NOW)).contains("MRTD"));
    let mut keys = expected;
    keys[63] ^= 1;
    assert!(refused(ok(TDX_QUOTE, TDX_COLLATERAL, &policy, &keys, TDX_NOW)).contains("report_data"));
    // Another quote's collateral.
    refused(ok(TDX_QUOTE, TDX_OUTDATED_COLLATERAL, &policy, &expected, MARCH_2026));
}

#[test]
fn a_tdx_platform_below_every_known_tcb_level_is_refused() {
    // dcap-qvl's "outdated" sample: genuine signatures, but its TCB matches no level of its own
    // collateral's TCB info.
    let expected = tdx_report_data(TDX_OUTDATED);
    let e = refused(attest::verify(
        &tdx(TDX_OUTDATED, TDX_OUTDATED_COLLATERAL),
        &tdx_policy(TDX_OUTDATED),
        &expected,
        MARCH_2026,
    ));
    assert!(e.contains("TCB"), "{e}");
}

#[test]
fn the_insecure_attester_is_refused_unless_the_run_allows_it_and_always_says_so() {
    let data = [5u8; 64];
    let ev = Evidence::insecure_dev(&data, "dev");
    let e = refused(attest::verify(&ev, &AttestationPolicy::default(), &data, 0));
    assert!(e.contains("INSECURE"), "{e}");
    let dev = AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    let v = attest::verify(&ev, &dev, &data, 0).unwrap();
    assert!(v.insecure);
    assert!(v.to_string().contains("INSECURE"));
    assert!(refused(attest::verify(&ev, &dev, &[6u8; 64], 0)).contains("report_data"));
    // SEV-SNP evidence is never taken for the stand-in, whatever the policy allows.
    refused(attest::verify(&sev(&milan(), MILAN_VCEK), &dev, &milan_report_data(), 0));
}

/// A SEV-SNP guest whose policy allows debugging is refused: the sample's policy (offset 0x08,
/// bit 19 is DEBUG) is edited, which no real chip would sign, so the guest check is run alone.
#[test]
fn a_debug_guest_is_refused() {
    attest::sev_snp_guest_policy(&milan()).unwrap();
    let mut r = milan();
    r[0x08 + 2] |= 0x08; // bit 19 of the little-endian policy
    let e = attest::sev_snp_guest_policy(&r).unwrap_err().to_string();
    assert!(e.contains("debugging"), "{e}");
    // Through the whole verifier the edit is caught too (the signature no longer covers it).
    refused(attest::verify(&sev(&r, MILAN_VCEK), &sev_policy(), &milan_report_data(), 0));
}

/// A server's attestation runs the same vendor verification: genuine sample evidence passes
/// the chain, signature and measurement checks and is then refused because it does not bind
/// this server's keys, weights and the client's nonce (no sample could).
#[test]
fn serving_attestations_check_vendor_evidence_and_bind_keys_model_and_nonce() {
    use tessera_trust::serving::{Expected, ServerAttestation};
    let nonce = [7u8; 32];
    let server = |evidence: Evidence| ServerAttestation {
        model: "tessera-r3".into(),
        model_blake3: hex::encode([1u8; 32]),
        binary_blake3: hex::encode([2u8; 32]),
        signing_key: tessera_trust::Identity::generate().unwrap().public().hex(),
        sealing_key: hex::encode(tessera_trust::OpeningKey::generate().unwrap().public().0),
        tls_spki_sha256: None,
        nonce: hex::encode(nonce),
        evidence,
    };
    let expected = Expected { nonce, ..Default::default() };
    let snp = server(sev(&milan(), MILAN_VCEK));
    let e = refused(snp.verify(&sev_policy(), &expected, 0));
    assert!(e.contains("sev-snp") && e.contains("report_data"), "{e}");
    // The measurement is checked before the binding: an unpinned one is named.
    let other = AttestationPolicy { sev_snp_measurements: vec!["00".repeat(48)], ..Default::default() };
    assert!(refused(snp.verify(&other, &expected, 0)).contains("measurement"));
    let td = server(tdx(TDX_QUOTE, TDX_COLLATERAL));
    let e = refused(td.verify(&tdx_policy(TDX_QUOTE), &expected, TDX_NOW));
    assert!(e.contains("tdx") && e.contains("report_data"), "{e}");
    // A replayed report (another nonce) is refused before any evidence is looked at.
    let replay = Expected { nonce: [8u8; 32], ..Default::default() };
    assert!(refused(td.verify(&tdx_policy(TDX_QUOTE), &replay, TDX_NOW)).contains("nonce"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Hostile bytes in any position of genuine evidence: refused, never a panic.
    #[test]
    fn corrupted_evidence_never_panics(at in 0usize..5006, len in 0usize..5006, byte in proptest::prelude::any::<u8>()) {
        let mut r = milan();
        let i = at % r.len();
        r[i] = byte;
        r.truncate(len.max(1).min(r.len()));
        let _ = attest::verify(&sev(&r, MILAN_VCEK), &sev_policy(), &milan_report_data(), 0);
        let mut v = MILAN_VCEK.to_vec();
        let i = at % v.len();
        v[i] = byte;
        let _ = attest::verify(&sev(&milan(), &v), &sev_policy(), &milan_report_data(), 0);
        let mut q = TDX_QUOTE.to_vec();
        let i = at % q.len();
        q[i] = byte;
        q.truncate(len.max(1));
        let _ = attest::verify(&tdx(&q, TDX_COLLATERAL), &tdx_policy(TDX_QUOTE), &tdx_report_data(TDX_QUOTE), TDX_NOW);
    }

    /// Hostile JSON where a validator's attestation is expected: an error, never a panic.
    #[test]
    fn hostile_attestation_json_never_panics(s in ".{0,300}") {
        if let Ok(a) = serde_json::from_str::<tessera_trust::ValidatorAttestation>(&s) {
            let _ = a.verify(&sev_policy(), TDX_NOW);
        }
    }
}
