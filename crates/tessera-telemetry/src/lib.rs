//! `tessera-telemetry`: Prometheus metrics: one recorder per process, shared by every component in it (a hub, a
//! server and a validator may share a process in tests), rendered as Prometheus text at
//! `/metrics`. Components record with the `metrics` macros; until [`prometheus`] installs the
//! recorder those are no-ops.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Histogram buckets, in seconds: a millisecond to a minute.
const SECONDS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder on first use; `None` if another recorder was installed first.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().set_buckets(&SECONDS).ok()?.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// The Prometheus text exposition of everything recorded so far in this process.
pub fn render() -> String {
    prometheus().map(PrometheusHandle::render).unwrap_or_default()
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A `/metrics` answer: the content-type header and [`render`]'s text (an axum response as it is).
pub fn exposition() -> ([(&'static str, &'static str); 1], String) {
    ([("content-type", CONTENT_TYPE)], render())
}
