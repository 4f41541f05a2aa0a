//! `tessera-hub`: the DiLoCo hub. It holds a run's global weights and outer optimizer, hands
//! contributors their assignments, accepts their compressed pseudo-gradients, closes each round
//! at quorum or deadline, and publishes content-addressed checkpoints and compressed updates.
//!
//! No libtorch: the hub works on f32 buffers (`tessera-aggregate`) and bytes
//! (`tessera-protocol`). Every decision is the round core's (`tessera-round`); this crate is
//! its shell: metadata in SQL (`db`), blobs in an object store (`store`), HTTP (`http`), and
//! the hub's work split along its seams (`intake`, `rounds`, `validator`, `economy`, `views`).

pub mod db;
mod economy;
mod governance;
pub mod http;
pub mod hub;
mod intake;
mod pieces;
mod recover;
mod rounds;
mod running;
pub mod store;
mod tasks;
mod validator;
mod views;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

pub use db::Db;
pub use hub::{Hub, HubConfig, NewRun};
pub use intake::Claim;
pub use store::{Store, checkpoint_key};
pub use tessera_aggregate::round::{Grower, Grown};

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A service (the store, the database) failed for a while: the work is retried, nothing
    /// is decided on it.
    #[error("unavailable, retried: {0}")]
    Unavailable(String),
    #[error("stored weights: {0}")]
    Weights(#[from] tessera_protocol::WeightsError),
    #[error("aggregation: {0}")]
    Aggregate(#[from] tessera_aggregate::AggregateError),
    #[error("codec: {0}")]
    Codec(#[from] tessera_protocol::CodecError),
    #[error("round core: {0}")]
    Round(#[from] tessera_round::RoundError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("inconsistent hub state: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serves the run on `listener` within `limits` until `shutdown` resolves. Closes rounds
/// whose deadline has passed every `tick`.
pub async fn serve(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    limits: tessera_edge::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let ticker = {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            for tick in 0u64.. {
                interval.tick().await;
                if let Err(e) = hub.tick().await {
                    tracing::error!(error = %e, "closing a round at its deadline failed; retrying");
                }
                // Once a second: nonces too old to be accepted again are forgotten.
                if tick % 10 == 0
                    && let Err(e) = hub.db.forget_nonces(hub::now_ms() - 2 * tessera_trust::identity::MAX_SKEW_MS).await
                {
                    tracing::warn!(error = %e, "could not forget old nonces");
                }
                if tick % 600 == 0 {
                    hub.forget_idle_keys();
                }
                // Once a minute: the journal keeps its last 100,000 decisions (a replica
                // further behind reloads the whole state).
                if tick % 600 == 599
                    && let Err(e) = hub.db.prune_events(100_000).await
                {
                    tracing::warn!(error = %e, "could not prune the journal");
                }
            }
        })
    };
    // Replicas on one PostgreSQL: another's commit is heard at once (the clock's catch-up,
    // every 100 ms, is the fallback), so long-polls wake when any replica publishes.
    let listening = hub.db.shared().then(|| {
        let hub = hub.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = listen(&hub).await {
                    tracing::warn!(error = %e, "listening for other replicas' commits failed; again in 1 s");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    });
    let limits = tessera_edge::Limits { refusal: http::edge_refusal, ..limits };
    let result = tessera_edge::serve(listener, http::router(hub), limits, shutdown).await;
    ticker.abort();
    if let Some(task) = listening {
        task.abort();
    }
    Ok(result?)
}

/// Catches up whenever another replica commits (`LISTEN tessera_events`).
async fn listen(hub: &Hub) -> Result<(), HubError> {
    let mut listener = sqlx::postgres::PgListener::connect(hub.db.url()).await?;
    listener.listen(db::EVENTS_CHANNEL).await?;
    loop {
        listener.recv().await?;
        hub.catch_up().await?;
    }
}
