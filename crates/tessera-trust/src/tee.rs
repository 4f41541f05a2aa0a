//! Where a validator's or a server's attestation comes from.
//!
//! In a confidential VM, Linux (6.7 and later) exposes one interface for both SEV-SNP and TDX
//! guests, configfs-tsm: write 64 bytes of report data to a new report's `inblob`, read the
//! signed report (SEV-SNP) or quote (TDX) from `outblob`. The chip's VCEK (SEV-SNP, from AMD's
//! key distribution service) or the quote's DCAP collateral (TDX, from a PCCS) is fetched ahead
//! of time and given as a file. Everywhere else the only source is the INSECURE development
//! attester, which must be asked for by name.

use std::path::{Path, PathBuf};

use crate::Evidence;

/// The default configfs-tsm report directory.
pub const TSM_REPORTS: &str = "/sys/kernel/config/tsm/report";

#[derive(Debug, Clone)]
pub enum Attester {
    /// The kernel's configfs-tsm interface, with the verifier's supporting files.
    Tsm { reports: PathBuf, vcek: Option<PathBuf>, tdx_collateral: Option<PathBuf> },
    /// No TEE: the process vouches for itself. Only for development; shown as INSECURE.
    InsecureDev,
}

impl Attester {
    /// Evidence committing to `report_data`.
    pub fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, String> {
        match self {
            Attester::InsecureDev => {
                Ok(Evidence::insecure_dev(report_data, &format!("tessera {}", env!("CARGO_PKG_VERSION"))))
            }
            Attester::Tsm { reports, vcek, tdx_collateral } => {
                tsm(reports, report_data, vcek.as_deref(), tdx_collateral.as_deref())
            }
        }
    }
}

fn tsm(
    reports: &Path,
    report_data: &[u8; 64],
    vcek: Option<&Path>,
    collateral: Option<&Path>,
) -> Result<Evidence, String> {
    if !reports.is_dir() {
        return Err(format!(
            "no TEE here: {} does not exist (not a SEV-SNP or TDX guest, or a kernel without configfs-tsm). \
             For development only, --insecure-dev-tee runs an INSECURE stand-in",
            reports.display()
        ));
    }
    // One directory per report: a server may ask for several at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = reports.join(format!("tessera-{}-{n}", std::process::id()));
    let io = |what: &str, e: std::io::Error| format!("configfs-tsm {what} in {}: {e}", dir.display());
    std::fs::create_dir(&dir).map_err(|e| io("create", e))?;
    let result = report_in(&dir, report_data, vcek, collateral);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// One configfs-tsm report directory (the kernel made its files): the report data in, the
/// provider and the signed report or quote out, with the verifier's supporting file.
fn report_in(
    dir: &Path,
    report_data: &[u8; 64],
    vcek: Option<&Path>,
    collateral: Option<&Path>,
) -> Result<Evidence, String> {
    let io = |what: &str, e: std::io::Error| format!("configfs-tsm {what} in {}: {e}", dir.display());
    std::fs::write(dir.join("inblob"), report_data).map_err(|e| io("inblob", e))?;
    let provider = std::fs::read_to_string(dir.join("provider")).map_err(|e| io("provider", e))?;
    let out = std::fs::read(dir.join("outblob")).map_err(|e| io("outblob", e))?;
    let read = |p: Option<&Path>, what: &str| -> Result<Vec<u8>, String> {
        let p = p.ok_or_else(|| format!("a {} guest needs --{what} (fetched ahead of time)", provider.trim()))?;
        std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
    };
    match provider.trim() {
        "sev_guest" => Ok(Evidence::SevSnp { report: hex::encode(out), vcek: hex::encode(read(vcek, "vcek")?) }),
        "tdx_guest" => {
            let collateral = serde_json::from_slice(&read(collateral, "tdx-collateral")?)
                .map_err(|e| format!("TDX collateral: {e}"))?;
            Ok(Evidence::Tdx { quote: hex::encode(out), collateral })
        }
        other => Err(format!("configfs-tsm provider {other:?} is neither sev_guest nor tdx_guest")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttestationPolicy, attest};

    const MILAN_REPORT_HEX: &str = include_str!("../testdata/report_milan.hex");
    const MILAN_VCEK: &[u8] = include_bytes!("../testdata/vcek_milan.der");
    const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote.bin");
    const TDX_COLLATERAL: &str = include_str!("../testdata/tdx_quote_collateral.json");

    /// A report directory as the kernel fills it, from a vendor's genuine sample.
    fn guest(provider: &str, outblob: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("provider"), format!("{provider}\n")).unwrap();
        std::fs::write(dir.path().join("outblob"), outblob).unwrap();
        dir
    }

    /// The configfs-tsm exchange yields evidence the real verifier accepts (SEV-SNP with its
    /// VCEK, TDX with its collateral), and each missing piece is named.
    #[test]
    fn configfs_tsm_reports_become_evidence_the_verifier_accepts() {
        let report = hex::decode(MILAN_REPORT_HEX.trim()).unwrap();
        let data: [u8; 64] = report[0x50..0x90].try_into().unwrap();
        let files = tempfile::tempdir().unwrap();
        let vcek = files.path().join("vcek.der");
        std::fs::write(&vcek, MILAN_VCEK).unwrap();
        let dir = guest("sev_guest", &report);
        let ev = report_in(dir.path(), &data, Some(&vcek), None).unwrap();
        assert_eq!(std::fs::read(dir.path().join("inblob")).unwrap(), data, "the report data went in");
        let policy =
            AttestationPolicy { sev_snp_measurements: vec![hex::encode(&report[0x90..0xC0])], ..Default::default() };
        assert_eq!(attest::verify(&ev, &policy, &data, 0).unwrap().kind, "sev-snp");
        let e = report_in(dir.path(), &data, None, None).unwrap_err();
        assert!(e.contains("--vcek"), "{e}");

        let collateral = files.path().join("collateral.json");
        std::fs::write(&collateral, TDX_COLLATERAL).unwrap();
        let dir = guest("tdx_guest", TDX_QUOTE);
        let data: [u8; 64] = TDX_QUOTE[48 + 520..48 + 584].try_into().unwrap();
        let ev = report_in(dir.path(), &data, None, Some(&collateral)).unwrap();
        let policy =
            AttestationPolicy { tdx_mrtds: vec![hex::encode(&TDX_QUOTE[48 + 136..48 + 184])], ..Default::default() };
        assert_eq!(attest::verify(&ev, &policy, &data, 1_751_328_000).unwrap().kind, "tdx");
        assert!(report_in(dir.path(), &data, None, None).unwrap_err().contains("--tdx-collateral"));

        let dir = guest("arm_cca", b"x");
        assert!(report_in(dir.path(), &data, None, None).unwrap_err().contains("neither"));
        let e = Attester::Tsm { reports: files.path().join("absent"), vcek: None, tdx_collateral: None }
            .evidence(&data)
            .unwrap_err();
        assert!(e.contains("no TEE here") && e.contains("--insecure-dev-tee"), "{e}");
    }
}
