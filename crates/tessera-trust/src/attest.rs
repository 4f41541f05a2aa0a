//! Attestation: evidence that the validator's keys were made inside a confidential VM running
//! the pinned code, and the policy that decides whether to believe it.
//!
//! The validator commits to its two public keys in the report's 64-byte `report_data`
//! ([`report_data`]). The vendors' crates do the cryptography — `sev` parses SEV-SNP reports and
//! checks the ARK → ASK → VCEK chain and the report's signature; `dcap-qvl` checks a TDX quote's
//! whole DCAP chain, CRLs and TCB status at an explicit time. What they leave to the caller is
//! here: debug and VMPL, the TCB the VCEK was issued for against the one reported, the chip id,
//! accepted TCB statuses, the measurement, and the key binding.

use std::fmt;

use serde::{Deserialize, Serialize};
use sev::certs::snp::{Certificate, Chain, Verifiable, builtin, ca};
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;

use crate::TrustError;

/// What a validator publishes: its keys and the evidence that binds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidatorAttestation {
    /// X25519 HPKE public key submissions are sealed to (hex).
    pub sealing_key: String,
    /// Ed25519 key that signs receipts and round roots (hex).
    pub signing_key: String,
    pub evidence: Evidence,
}

/// A TEE's evidence, as sent over the wire (hex for bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Evidence {
    /// An AMD SEV-SNP attestation report and the VCEK (DER) of the chip that signed it.
    SevSnp { report: String, vcek: String },
    /// An Intel TDX quote and its DCAP collateral (`dcap_qvl::QuoteCollateralV3`).
    Tdx { quote: String, collateral: serde_json::Value },
    /// No TEE: the validator vouches for itself. Accepted only by a policy that allows it, and
    /// marked INSECURE wherever it shows.
    InsecureDev { report_data: String, measurement: String },
}

impl Evidence {
    pub fn kind(&self) -> &'static str {
        match self {
            Evidence::SevSnp { .. } => "sev-snp",
            Evidence::Tdx { .. } => "tdx",
            Evidence::InsecureDev { .. } => "insecure-dev",
        }
    }

    /// A software stand-in for development machines: it proves nothing.
    pub fn insecure_dev(report_data: &[u8; 64], measurement: &str) -> Evidence {
        Evidence::InsecureDev { report_data: hex::encode(report_data), measurement: measurement.to_owned() }
    }
}

pub use tessera_protocol::api::AttestationPolicy;

/// What verification established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub kind: String,
    /// Hex launch measurement (SEV-SNP) or MRTD (TDX) — or the stand-in's claim.
    pub measurement: String,
    /// TCB status (TDX), the reported TCB (SEV-SNP), or `INSECURE`.
    pub tcb: String,
    /// The software attester: nothing was proven.
    pub insecure: bool,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.insecure {
            write!(f, "INSECURE development attestation (no TEE; measurement claimed {})", self.measurement)
        } else {
            write!(f, "{} measurement {} ({})", self.kind, self.measurement, self.tcb)
        }
    }
}

/// The `report_data` a validator's evidence must carry: 64 bytes of BLAKE3 (keyed to this use)
/// over its HPKE public key then its signing key.
pub fn report_data(sealing_key: &[u8; 32], signing_key: &[u8; 32]) -> [u8; 64] {
    let mut h = blake3::Hasher::new_derive_key("tessera 2026 validator keys v1");
    h.update(sealing_key);
    h.update(signing_key);
    let mut out = [0u8; 64];
    h.finalize_xof().fill(&mut out);
    out
}

fn refuse(kind: &'static str, reason: impl Into<String>) -> TrustError {
    TrustError::Attestation { kind, reason: reason.into() }
}

fn unhex(kind: &'static str, field: &str, s: &str) -> Result<Vec<u8>, TrustError> {
    hex::decode(s).map_err(|_| refuse(kind, format!("{field} is not hex")))
}

impl ValidatorAttestation {
    /// Checks the evidence under `policy` at `now_secs` (Unix time; TDX collateral must be
    /// valid then) and that it commits to this attestation's two keys.
    pub fn verify(&self, policy: &AttestationPolicy, now_secs: u64) -> Result<Verified, TrustError> {
        let sealing = crate::SealingKey::parse(&self.sealing_key)?;
        let signing = crate::PublicKey::parse(&self.signing_key)?;
        verify(&self.evidence, policy, &report_data(&sealing.0, &signing.0), now_secs)
    }
}

/// Verifies `evidence` under `policy`, expecting `expected` as its report data.
pub fn verify(
    evidence: &Evidence,
    policy: &AttestationPolicy,
    expected: &[u8; 64],
    now_secs: u64,
) -> Result<Verified, TrustError> {
    match evidence {
        Evidence::SevSnp { report, vcek } => {
            verify_sev_snp(&unhex("sev-snp", "report", report)?, &unhex("sev-snp", "vcek", vcek)?, policy, expected)
        }
        Evidence::Tdx { quote, collateral } => {
            verify_tdx(&unhex("tdx", "quote", quote)?, collateral, policy, expected, now_secs)
        }
        Evidence::InsecureDev { report_data, measurement } => {
            if !policy.allow_insecure_dev {
                return Err(refuse(
                    "insecure-dev",
                    "the run does not accept the INSECURE development attester (no TEE); it needs SEV-SNP or TDX evidence",
                ));
            }
            if unhex("insecure-dev", "report_data", report_data)? != expected {
                return Err(refuse("insecure-dev", "report_data does not commit to these keys"));
            }
            tracing::warn!("accepting an INSECURE development attestation: nothing about the attested party is proven");
            Ok(Verified {
                kind: "insecure-dev".into(),
                measurement: measurement.clone(),
                tcb: "INSECURE".into(),
                insecure: true,
            })
        }
    }
}

/// AMD's VCEK extensions: the TCB the key was issued for, and the chip it belongs to.
const OID_BL_SPL: &str = "1.3.6.1.4.1.3704.1.3.1";
const OID_TEE_SPL: &str = "1.3.6.1.4.1.3704.1.3.2";
const OID_SNP_SPL: &str = "1.3.6.1.4.1.3704.1.3.3";
const OID_UCODE_SPL: &str = "1.3.6.1.4.1.3704.1.3.8";
const OID_HW_ID: &str = "1.3.6.1.4.1.3704.1.4";

/// The VCEK's (bootloader, tee, snp, microcode) SPLs and hardware id.
fn vcek_claims(vcek_der: &[u8]) -> Result<([u8; 4], Vec<u8>), TrustError> {
    use x509_cert::der::{Decode, asn1::OctetString};
    let cert = x509_cert::Certificate::from_der(vcek_der).map_err(|e| refuse("sev-snp", format!("VCEK: {e}")))?;
    let mut spl = [None::<u8>; 4];
    let mut hw_id = None;
    for ext in cert.tbs_certificate.extensions.iter().flatten() {
        let oid = ext.extn_id.to_string();
        let value = ext.extn_value.as_bytes();
        let slot = [OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL].iter().position(|o| *o == oid);
        if let Some(i) = slot {
            // A DER INTEGER 0..=255: tag 2, length 1 or 2 (a leading zero for values ≥ 128).
            let n = match value {
                [2, 1, v] => *v,
                [2, 2, 0, v] => *v,
                _ => return Err(refuse("sev-snp", format!("VCEK extension {oid} is not a small integer"))),
            };
            spl[i] = Some(n);
        } else if oid == OID_HW_ID {
            // Milan's VCEKs hold the id raw; some tools wrap it in an OCTET STRING.
            hw_id =
                Some(OctetString::from_der(value).map(|o| o.as_bytes().to_vec()).unwrap_or_else(|_| value.to_vec()));
        }
    }
    let mut out = [0u8; 4];
    for (o, s) in out.iter_mut().zip(spl) {
        *o = s.ok_or_else(|| refuse("sev-snp", "the VCEK lacks a TCB extension"))?;
    }
    Ok((out, hw_id.ok_or_else(|| refuse("sev-snp", "the VCEK lacks its hardware id"))?))
}

/// The guest's own policy: no debugging (the host could read its memory) and VMPL 0.
fn check_sev_snp_guest(report: &AttestationReport) -> Result<(), TrustError> {
    if report.policy.debug_allowed() {
        return Err(refuse("sev-snp", "the guest policy allows debugging: its memory is readable by the host"));
    }
    if report.vmpl != 0 {
        return Err(refuse("sev-snp", format!("the report comes from VMPL {}, not 0", report.vmpl)));
    }
    Ok(())
}

/// [`check_sev_snp_guest`] alone on a report's bytes, for tests: a debug guest's report cannot
/// be made without AMD's hardware, so the check is tested on a sample whose policy is edited.
#[doc(hidden)]
pub fn sev_snp_guest_policy(report_bytes: &[u8]) -> Result<(), TrustError> {
    let report = AttestationReport::from_bytes(report_bytes).map_err(|e| refuse("sev-snp", format!("report: {e}")))?;
    check_sev_snp_guest(&report)
}

fn verify_sev_snp(
    report_bytes: &[u8],
    vcek_der: &[u8],
    policy: &AttestationPolicy,
    expected: &[u8; 64],
) -> Result<Verified, TrustError> {
    let report = AttestationReport::from_bytes(report_bytes).map_err(|e| refuse("sev-snp", format!("report: {e}")))?;
    let vcek = Certificate::from_der(vcek_der).map_err(|e| refuse("sev-snp", format!("VCEK: {e}")))?;
    // The VCEK must chain to one of AMD's roots (built into `sev`), and sign the report.
    let roots = [
        ("Milan", builtin::milan::ark(), builtin::milan::ask()),
        ("Genoa", builtin::genoa::ark(), builtin::genoa::ask()),
        ("Turin", builtin::turin::ark(), builtin::turin::ask()),
    ];
    let mut chained = None;
    for (name, ark, ask) in roots {
        let (Ok(ark), Ok(ask)) = (ark, ask) else { continue };
        let chain = Chain { ca: ca::Chain { ark, ask }, vek: vcek.clone() };
        if chain.verify().is_ok() {
            chained = Some((name, chain));
            break;
        }
    }
    let (generation, chain) =
        chained.ok_or_else(|| refuse("sev-snp", "the VCEK does not chain to AMD's Milan, Genoa or Turin root"))?;
    (&chain, &report)
        .verify()
        .map_err(|e| refuse("sev-snp", format!("the report's signature does not verify: {e}")))?;
    // What `sev` leaves to the caller.
    check_sev_snp_guest(&report)?;
    let (spl, hw_id) = vcek_claims(vcek_der)?;
    let t = &report.reported_tcb;
    let reported = [t.bootloader, t.tee, t.snp, t.microcode];
    if reported != spl {
        return Err(refuse(
            "sev-snp",
            format!("reported TCB {reported:?} is not the TCB {spl:?} the VCEK was issued for"),
        ));
    }
    if hw_id.as_slice() != report.chip_id.as_slice() {
        return Err(refuse("sev-snp", "the chip id is not the VCEK's hardware id"));
    }
    let measurement = hex::encode(report.measurement);
    if !policy.sev_snp_measurements.iter().any(|m| m.eq_ignore_ascii_case(&measurement)) {
        return Err(refuse("sev-snp", format!("measurement {measurement} is not one the run accepts")));
    }
    if &report.report_data != expected {
        return Err(refuse("sev-snp", "report_data does not commit to these keys"));
    }
    Ok(Verified {
        kind: "sev-snp".into(),
        measurement,
        tcb: format!(
            "{generation}, TCB bl {} tee {} snp {} ucode {}",
            reported[0], reported[1], reported[2], reported[3]
        ),
        insecure: false,
    })
}

fn verify_tdx(
    quote: &[u8],
    collateral: &serde_json::Value,
    policy: &AttestationPolicy,
    expected: &[u8; 64],
    now_secs: u64,
) -> Result<Verified, TrustError> {
    let collateral: dcap_qvl::QuoteCollateralV3 =
        serde_json::from_value(collateral.clone()).map_err(|e| refuse("tdx", format!("collateral: {e}")))?;
    // Debug TDs are refused by the verifier (its default).
    let verified = dcap_qvl::verify::QuoteVerifier::new_prod()
        .verify(quote, &collateral, now_secs)
        .map_err(|e| refuse("tdx", format!("{e:#}")))?;
    let accepted = |s: &str| {
        if policy.tdx_statuses.is_empty() { s == "UpToDate" } else { policy.tdx_statuses.iter().any(|a| a == s) }
    };
    if !accepted(&verified.status) {
        return Err(refuse(
            "tdx",
            format!(
                "TCB status {} (advisories {:?}) is not one the run accepts",
                verified.status, verified.advisory_ids
            ),
        ));
    }
    let td = verified.report.as_td10().ok_or_else(|| refuse("tdx", "the quote is an SGX enclave's, not a TD's"))?;
    let measurement = hex::encode(td.mr_td);
    if !policy.tdx_mrtds.iter().any(|m| m.eq_ignore_ascii_case(&measurement)) {
        return Err(refuse("tdx", format!("MRTD {measurement} is not one the run accepts")));
    }
    if &td.report_data != expected {
        return Err(refuse("tdx", "report_data does not commit to these keys"));
    }
    Ok(Verified { kind: "tdx".into(), measurement, tcb: verified.status, insecure: false })
}
