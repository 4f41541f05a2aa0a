//! API keys and the usage meter, in SQLite.
//!
//! A key is `tsk_` and 48 hex digits of OS randomness, shown once when it is created; the
//! database keeps only its BLAKE3 hash (a 192-bit random key needs no salt), a short prefix to
//! recognise it by, its rate limit and whether it was revoked.
//!
//! Usage is billed to the open epoch: each completed request adds one row to it, atomically
//! with reading which epoch is open, and closing the epoch ([`Store::close_epoch`]) opens the
//! next in the same transaction, so a closed epoch's usage never changes again.

use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};

use crate::ServeError;

/// Requests per minute a key gets unless told otherwise.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 600;

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub name: String,
    /// The key's first characters, enough to tell keys apart.
    pub prefix: String,
    pub requests_per_minute: u32,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

/// One key's usage in one epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpochUsage {
    pub epoch: u64,
    pub account: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

fn db(e: sqlx::Error) -> ServeError {
    ServeError::Store(e.to_string())
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub fn hash_key(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store, ServeError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| ServeError::Store(format!("{}: {e}", parent.display())))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(db)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(db)?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| ServeError::Store(e.to_string()))?;
        Ok(Store { pool })
    }

    /// Creates a key named `name`; returns the key itself (shown once) and its record.
    pub async fn create_key(&self, name: &str, requests_per_minute: u32) -> Result<(String, KeyInfo), ServeError> {
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(ServeError::Invalid(format!("key name {name:?}: use 1 to 64 letters, digits and - _ . @")));
        }
        if requests_per_minute == 0 {
            return Err(ServeError::Invalid("a key's rate limit must be at least one request a minute".into()));
        }
        let mut secret = [0u8; 24];
        getrandom::fill(&mut secret).map_err(|e| ServeError::Store(format!("no OS randomness: {e}")))?;
        let key = format!("tsk_{}", hex::encode(secret));
        let prefix = key[..10].to_owned();
        let created = now_ms();
        let id = sqlx::query(
            "INSERT INTO api_keys (name, hash, prefix, requests_per_minute, created_ms) VALUES (?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(name)
        .bind(hash_key(&key))
        .bind(&prefix)
        .bind(i64::from(requests_per_minute))
        .bind(created)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                ServeError::Invalid(format!("a key named {name:?} already exists"))
            }
            e => db(e),
        })?
        .get::<i64, _>(0);
        Ok((key, KeyInfo { id, name: name.into(), prefix, requests_per_minute, created_ms: created, revoked_ms: None }))
    }

    /// Revokes the key named `name`; it is refused from the next request on.
    pub async fn revoke_key(&self, name: &str) -> Result<(), ServeError> {
        let done = sqlx::query("UPDATE api_keys SET revoked_ms = ? WHERE name = ? AND revoked_ms IS NULL")
            .bind(now_ms())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(ServeError::Invalid(format!("no active key named {name:?}")));
        }
        Ok(())
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ServeError> {
        let rows = sqlx::query(
            "SELECT id, name, prefix, requests_per_minute, created_ms, revoked_ms FROM api_keys ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows.iter().map(key_info).collect())
    }

    /// The active key whose hash is `hash`.
    pub async fn find_key(&self, hash: &str) -> Result<Option<KeyInfo>, ServeError> {
        let row = sqlx::query(
            "SELECT id, name, prefix, requests_per_minute, created_ms, revoked_ms FROM api_keys \
             WHERE hash = ? AND revoked_ms IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        Ok(row.as_ref().map(key_info))
    }

    /// Bills one completed request to `key_id` in the open epoch.
    pub async fn record(
        &self,
        key_id: i64,
        endpoint: &str,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) -> Result<(), ServeError> {
        sqlx::query(
            "INSERT INTO usage (key_id, epoch, time_ms, endpoint, prompt_tokens, completion_tokens) \
             SELECT ?, open_epoch, ?, ?, ?, ? FROM meter WHERE id = 0",
        )
        .bind(key_id)
        .bind(now_ms())
        .bind(endpoint)
        .bind(prompt_tokens as i64)
        .bind(completion_tokens as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    pub async fn open_epoch(&self) -> Result<u64, ServeError> {
        let row = sqlx::query("SELECT open_epoch FROM meter WHERE id = 0").fetch_one(&self.pool).await.map_err(db)?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// Closes the open epoch and opens the next; returns the closed epoch's usage per key.
    pub async fn close_epoch(&self) -> Result<(u64, Vec<EpochUsage>), ServeError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let epoch = sqlx::query("UPDATE meter SET open_epoch = open_epoch + 1 WHERE id = 0 RETURNING open_epoch - 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .get::<i64, _>(0) as u64;
        tx.commit().await.map_err(db)?;
        Ok((epoch, self.usage(epoch).await?))
    }

    /// An epoch's usage per key, by key name.
    pub async fn usage(&self, epoch: u64) -> Result<Vec<EpochUsage>, ServeError> {
        let rows = sqlx::query(
            "SELECT k.name, COUNT(*), SUM(u.prompt_tokens), SUM(u.completion_tokens) FROM usage u \
             JOIN api_keys k ON k.id = u.key_id WHERE u.epoch = ? GROUP BY k.name ORDER BY k.name",
        )
        .bind(epoch as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| EpochUsage {
                epoch,
                account: r.get(0),
                requests: r.get::<i64, _>(1) as u64,
                prompt_tokens: r.get::<i64, _>(2) as u64,
                completion_tokens: r.get::<i64, _>(3) as u64,
            })
            .collect())
    }
}

fn key_info(r: &sqlx::sqlite::SqliteRow) -> KeyInfo {
    KeyInfo {
        id: r.get(0),
        name: r.get(1),
        prefix: r.get(2),
        requests_per_minute: r.get::<i64, _>(3).clamp(1, i64::from(u32::MAX)) as u32,
        created_ms: r.get(4),
        revoked_ms: r.get(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keys_are_stored_hashed_and_revocable_and_usage_closes_by_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.sqlite");
        let store = Store::open(&path).await.unwrap();
        let (key, info) = store.create_key("alice", 60).await.unwrap();
        assert!(key.starts_with("tsk_") && key.len() == 52);
        assert!(store.create_key("alice", 60).await.is_err(), "names are unique");
        assert!(store.create_key("bad name", 60).await.is_err());
        assert_eq!(store.find_key(&hash_key(&key)).await.unwrap().unwrap().id, info.id);
        assert!(store.find_key(&hash_key("tsk_guess")).await.unwrap().is_none());
        // The key itself is nowhere in the database file.
        drop(store);
        let bytes = std::fs::read(&path).unwrap();
        let wal = std::fs::read(path.with_extension("sqlite-wal")).unwrap_or_default();
        for b in [&bytes, &wal] {
            assert!(!b.windows(key.len()).any(|w| w == key.as_bytes()));
        }
        let store = Store::open(&path).await.unwrap();
        let (_, bob) = store.create_key("bob", 60).await.unwrap();
        store.record(info.id, "chat", 10, 5).await.unwrap();
        store.record(info.id, "chat", 1, 2).await.unwrap();
        store.record(bob.id, "completions", 7, 0).await.unwrap();
        let (epoch, usage) = store.close_epoch().await.unwrap();
        assert_eq!(epoch, 0);
        assert_eq!(
            usage,
            vec![
                EpochUsage { epoch: 0, account: "alice".into(), requests: 2, prompt_tokens: 11, completion_tokens: 7 },
                EpochUsage { epoch: 0, account: "bob".into(), requests: 1, prompt_tokens: 7, completion_tokens: 0 },
            ]
        );
        store.record(bob.id, "chat", 3, 3).await.unwrap();
        assert_eq!(store.open_epoch().await.unwrap(), 1);
        assert_eq!(store.usage(0).await.unwrap().len(), 2, "a closed epoch does not change");
        store.revoke_key("alice").await.unwrap();
        assert!(store.find_key(&hash_key(&key)).await.unwrap().is_none());
        assert!(store.revoke_key("alice").await.is_err());
    }
}
