//! Shared build script for the crates that link libtorch.
//!
//! torch-sys finds libtorch inside the project's Python virtual environment
//! (`LIBTORCH_USE_PYTORCH=1`) and exports its directory as `DEP_TCH_LIBTORCH_LIB`.
//! We bake that directory into every binary and test of the crate as an rpath,
//! so nobody has to set `LD_LIBRARY_PATH` to run them.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
