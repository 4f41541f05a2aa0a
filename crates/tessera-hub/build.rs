//! Fetches the dashboard's charting library (uPlot, pinned in dashboard/package-lock.json) with
//! `npm ci` into OUT_DIR, so the hub binary embeds it and serves the dashboard by itself.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = manifest.join("dashboard");
    println!("cargo:rerun-if-changed=dashboard/package.json");
    println!("cargo:rerun-if-changed=dashboard/package-lock.json");
    let npm_dir = out.join("dashboard-npm");
    std::fs::create_dir_all(&npm_dir).expect("creating OUT_DIR/dashboard-npm");
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(source.join(f), npm_dir.join(f)).unwrap_or_else(|e| panic!("copying dashboard/{f}: {e}"));
    }
    let dist = npm_dir.join("node_modules/uplot/dist");
    if !dist.join("uPlot.iife.min.js").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"])
            .current_dir(&npm_dir)
            .status()
            .unwrap_or_else(|e| {
                panic!("the hub's dashboard needs npm (Node.js) at build time to fetch its charting library: {e}")
            });
        assert!(status.success(), "npm ci for the dashboard's charting library failed ({status})");
    }
    for f in ["uPlot.iife.min.js", "uPlot.min.css"] {
        copy(&dist.join(f), &out.join(f));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}
