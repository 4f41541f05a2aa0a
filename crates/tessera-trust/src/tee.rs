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
    let result = (|| {
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
    })();
    let _ = std::fs::remove_dir(&dir);
    result
}
