//! Prepare → publish → serve over HTTP → fetch only the shards asked for: checked by hash,
//! resumed after a dropped connection, kept in a capped cache, prefetched while "training".

mod common;

use std::sync::Arc;

use common::*;
use tessera_client::link::Bucket;
use tessera_client::{ClientError, ShardCache};
use tessera_data::Dataset;
use tessera_data::manifest::{self, Split};
use tessera_prepare::{prepare, publish};

/// A published dataset of several shards under `root/published`, served over HTTP.
fn published(root: &std::path::Path) -> (Server, std::path::PathBuf) {
    let input = root.join("in.parquet");
    write_parquet(&input, &docs("f", 600), 100);
    let tokenizer = byte_tokenizer(root);
    let prepared = root.join("prepared");
    prepare(&config(vec![input.display().to_string()], &prepared, &tokenizer, 16_384), &mut |_| {}).unwrap();
    let dest = root.join("published");
    publish(&prepared, dest.to_str().unwrap()).unwrap();
    (serve(&dest), prepared)
}

fn shard_gets(server: &Server) -> Vec<String> {
    server.requests().into_iter().filter(|l| l.starts_with("GET /shards/")).collect()
}

#[test]
fn a_contributor_downloads_only_its_shards_and_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let (server, prepared) = published(dir.path());
    let local = Dataset::from_manifest(&prepared).unwrap();
    let cache_dir = dir.path().join("cache");
    let cache = ShardCache::open(&[server.url("")], None, &cache_dir, u64::MAX, None).unwrap();
    let m = cache.manifest.clone();
    let train: Vec<usize> = (0..m.shards.len()).filter(|&i| m.shards[i].split == Split::Train).collect();
    assert!(train.len() >= 4, "{} training shards", train.len());
    // Shard 2 of the training split, twice: one download, then the cache.
    let tokens = cache.shard(train[2]).unwrap();
    let offset: usize = m.split(Split::Train).take(2).map(|e| e.tokens as usize).sum();
    assert_eq!(tokens, local.train[offset..offset + tokens.len()]);
    assert_eq!(cache.shard(train[2]).unwrap(), tokens);
    let gets = shard_gets(&server);
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(gets[0].contains(&m.shards[train[2]].hash));
    assert_eq!(cache.stats().shards_fetched, 1);
    assert_eq!(cache.stats().cache_hits, 1);

    // Asked for another identity, the dataset is refused.
    let err = ShardCache::open(&[server.url("")], Some(&"0".repeat(64)), &cache_dir, u64::MAX, None);
    assert!(matches!(err, Err(ClientError::BadAnswer { .. })));
}

#[test]
fn a_dropped_connection_resumes_with_a_range_and_corrupt_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = published(dir.path());
    let cache = ShardCache::open(&[server.url("")], None, &dir.path().join("cache"), u64::MAX, None).unwrap();
    let entry = cache.manifest.shards[0].clone();
    let key = manifest::shard_path(&entry.hash);
    *server.cut.lock().unwrap() = Some((key.clone(), 10_000, 2));
    cache.shard(0).unwrap();
    let gets: Vec<String> = shard_gets(&server);
    assert_eq!(gets.len(), 3, "{gets:?}");
    assert!(!gets[0].contains("bytes="), "{gets:?}");
    assert!(gets[1].ends_with("bytes=10000-") && gets[2].ends_with("bytes=20000-"), "{gets:?}");
    assert_eq!(cache.stats().retries, 2);
    assert_eq!(cache.stats().downloaded_bytes, entry.bytes);

    // A server that serves other bytes under a shard's name: refused, nothing cached.
    let other = cache.manifest.shards[1].clone();
    let served = dir.path().join("published").join(manifest::shard_path(&other.hash));
    let mut bytes = std::fs::read(&served).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&served, bytes).unwrap();
    let err = cache.shard(1).unwrap_err().to_string();
    assert!(err.contains(&other.hash) && err.contains("corrupt"), "{err}");
    assert!(!dir.path().join("cache").join(format!("{}.tshard", other.hash)).exists());

    // A server that sends more bytes than the shard holds is cut off, nothing kept.
    let third = cache.manifest.shards[2].clone();
    let served = dir.path().join("published").join(manifest::shard_path(&third.hash));
    let mut longer = std::fs::read(&served).unwrap();
    longer.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&served, longer).unwrap();
    let err = cache.shard(2).unwrap_err().to_string();
    assert!(err.contains("more than the shard"), "{err}");
    assert!(!dir.path().join("cache").join(format!("{}.partial", third.hash)).exists());
}

#[test]
fn the_cache_keeps_to_its_cap_and_prefetching_hides_the_download() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = published(dir.path());
    let probe = ShardCache::open(&[server.url("")], None, &dir.path().join("probe"), u64::MAX, None).unwrap();
    let shard_bytes = probe.manifest.shards[0].bytes;
    // Room for two shards: a third evicts the least recently used.
    let cache_dir = dir.path().join("cache");
    let cache = Arc::new(ShardCache::open(&[server.url("")], None, &cache_dir, 2 * shard_bytes, None).unwrap());
    for i in 0..3 {
        cache.shard(i).unwrap();
    }
    let held = std::fs::read_dir(&cache_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "tshard"))
        .count();
    assert_eq!(held, 2);
    assert_eq!(cache.stats().evicted, 1);

    // A link of 2 MB/s: a shard takes ~16 ms to arrive. Prefetched during a longer "round", the
    // next shard is there when asked for.
    let slow = Arc::new(
        ShardCache::open(&[server.url("")], None, &dir.path().join("slow"), u64::MAX, Some(Bucket::shared(2e6)))
            .unwrap(),
    );
    slow.shard(0).unwrap();
    let first_stall = slow.stats().stall_s;
    assert!(first_stall > 0.0);
    for round in 1..4 {
        let next = slow.prefetch(vec![round]);
        std::thread::sleep(std::time::Duration::from_millis(150)); // training
        next.join().unwrap().unwrap();
        slow.shard(round).unwrap();
    }
    let stats = slow.stats();
    assert_eq!(stats.shards_fetched, 4);
    assert!(stats.stall_s - first_stall < 0.005, "stalled {:.3} s after the first round", stats.stall_s - first_stall);
}
