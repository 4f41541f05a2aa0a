//! Preparation end to end: FineWeb-layout parquet, JSONL and text, read locally, over HTTP
//! with Range requests and from S3 (moto), into shards and a manifest that load back; and every
//! kind of bad input, each with a clear error.

mod common;

use std::collections::HashSet;

use common::*;
use tessera_data::manifest::{self, Manifest, Split};
use tessera_data::{Dataset, TessTokenizer};
use tessera_prepare::{PrepareError, prepare, publish};

fn run(config: &tessera_prepare::PrepareConfig) -> Result<(Manifest, String), PrepareError> {
    prepare(config, &mut |_| {})
}

/// Documents of a prepared dataset, per split, decoded from its shards.
fn documents(dir: &std::path::Path) -> (Vec<String>, Vec<String>) {
    let ds = Dataset::from_manifest(dir).unwrap();
    let split = |tokens: &[u32]| -> Vec<String> {
        tokens
            .split(|&t| t == ds.tokenizer.eos_id())
            .filter(|d| !d.is_empty())
            .map(|d| ds.tokenizer.decode(d).unwrap())
            .collect()
    };
    (split(&ds.train), split(&ds.validation))
}

#[test]
fn parquet_jsonl_and_text_become_shards_split_by_document_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let a = docs("a", 300);
    write_parquet(&input.join("000_00000.parquet"), &a, 64);
    // The second file repeats ten of the first's documents, one with different spacing.
    let mut b = docs("b", 100);
    b.extend(a[..10].iter().map(|d| Doc { text: d.text.replace(". ", ".  \n"), id: format!("{}-again", d.id) }));
    write_parquet(&input.join("000_00001.parquet"), &b, 1000);
    let jsonl: String = docs("j", 20)
        .iter()
        .map(|d| serde_json::json!({"text": d.text, "id": d.id}).to_string() + "\n")
        .chain(["{\"text\": null}\n".into(), "\n".into()])
        .collect();
    std::fs::write(input.join("more.jsonl"), jsonl).unwrap();
    std::fs::write(input.join("notes.txt"), "A plain text file is one document.").unwrap();
    let tokenizer = byte_tokenizer(dir.path());
    let out = dir.path().join("out");
    let (m, id) = run(&config(vec![input.display().to_string()], &out, &tokenizer, 4096)).unwrap();

    assert_eq!(id, manifest::hash_hex(&std::fs::read(out.join("manifest.json")).unwrap()));
    assert_eq!(Manifest::read(&out).unwrap(), (m.clone(), id.clone()));
    let s = &m.stats;
    assert_eq!(s.documents_read, 300 + 110 + 22 + 1);
    assert_eq!(s.duplicates, 10);
    assert_eq!(s.empty, 2);
    assert_eq!(s.train_documents + s.validation_documents, 300 + 100 + 20 + 1);
    assert!(s.validation_documents > 10 && s.validation_documents < 90, "{s:?}");
    // Every shard but the last of each split is full; shards are named by their bytes' hash.
    for split in [Split::Train, Split::Validation] {
        let sizes: Vec<u64> = m.split(split).map(|e| e.tokens).collect();
        assert!(sizes[..sizes.len() - 1].iter().all(|&n| n == 4096), "{sizes:?}");
    }
    for e in &m.shards {
        let bytes = std::fs::read(out.join(manifest::shard_path(&e.hash))).unwrap();
        assert_eq!(manifest::hash_hex(&bytes), e.hash);
    }
    assert_eq!(m.tokens(Split::Train), s.train_tokens);
    // Provenance covers every row of the first file (all kept), each row in one range.
    let mut first: Vec<[u64; 2]> = m
        .shards
        .iter()
        .flat_map(|e| &e.sources)
        .filter(|p| p.source.ends_with("000_00000.parquet"))
        .map(|p| p.rows)
        .collect();
    first.sort_unstable();
    assert_eq!(first.iter().map(|r| r[1] - r[0]).sum::<u64>(), 300);
    assert_eq!((first[0][0], first.last().unwrap()[1]), (0, 300));
    // Documents are whole in one split, none in both, all present once.
    let (train, val) = documents(&out);
    let train_set: HashSet<&String> = train.iter().collect();
    assert!(val.iter().all(|d| !train_set.contains(d)));
    assert_eq!(train.len() + val.len(), 421);
    assert!(train.iter().chain(&val).any(|d| d == "A plain text file is one document."));
    assert!(!out.join(".prepare").exists(), "the journal is removed when done");
    // Preparing again gives the same dataset, byte for byte.
    let again = dir.path().join("again");
    let (_, id2) = run(&config(vec![input.display().to_string()], &again, &tokenizer, 4096)).unwrap();
    assert_eq!(id2, id);
}

#[test]
fn http_with_ranges_reads_only_the_text_columns_and_matches_local() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    // Large enough that the unread columns are most of the file.
    let many: Vec<Doc> = docs("h", 400).into_iter().map(|d| Doc { text: d.text, id: d.id }).collect();
    write_parquet(&input.join("part.parquet"), &many, 100);
    let tokenizer = byte_tokenizer(dir.path());
    let server = serve(&input);
    let http_out = dir.path().join("http");
    let (http, _) = run(&config(vec![server.url("part.parquet")], &http_out, &tokenizer, 8192)).unwrap();
    let local_out = dir.path().join("local");
    let (local, _) =
        run(&config(vec![input.join("part.parquet").display().to_string()], &local_out, &tokenizer, 8192)).unwrap();
    let hashes = |m: &Manifest| m.shards.iter().map(|e| e.hash.clone()).collect::<Vec<_>>();
    assert_eq!(hashes(&http), hashes(&local));
    let log = server.requests();
    assert!(log.iter().any(|l| l.starts_with("HEAD /part.parquet")), "{log:?}");
    let gets: Vec<&String> = log.iter().filter(|l| l.starts_with("GET")).collect();
    assert!(gets.iter().all(|l| l.contains("bytes=")), "every read is ranged: {log:?}");
    // hf:// resolves under HF_ENDPOINT to the repository's resolve URL.
    let url = tessera_prepare::source::hf_url("datasets/o/n/x.parquet").unwrap();
    assert!(url.ends_with("/datasets/o/n/resolve/main/x.parquet"));
}

#[test]
fn s3_inputs_and_publishing_to_s3() {
    let Some(bucket) = std::env::var("TESSERA_TEST_S3").ok() else {
        assert!(std::env::var_os("TESSERA_TEST_REQUIRE_SERVICES").is_none(), "TESSERA_TEST_S3 is not set");
        eprintln!("skipped: TESSERA_TEST_S3 is not set (scripts/test-services)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    write_parquet(&input.join("a.parquet"), &docs("s", 200), 50);
    let tokenizer = byte_tokenizer(dir.path());
    let local = dir.path().join("local");
    let (m, id) = run(&config(vec![input.display().to_string()], &local, &tokenizer, 4096)).unwrap();
    // Publish the prepared dataset to S3, then read the raw parquet from S3 too.
    let prefix = format!("{bucket}/prepare-test-{}", std::process::id());
    let report = publish(&local, &prefix).unwrap();
    assert_eq!((report.id.as_str(), report.uploaded, report.skipped), (id.as_str(), m.shards.len(), 0));
    assert_eq!(publish(&local, &prefix).unwrap().skipped, m.shards.len(), "a second publish uploads no shard");
    let raw = publish_raw(&input.join("a.parquet"), &format!("{prefix}/raw"));
    let from_s3 = dir.path().join("from-s3");
    let (m2, _) = run(&config(vec![raw], &from_s3, &tokenizer, 4096)).unwrap();
    let hashes = |m: &Manifest| m.shards.iter().map(|e| e.hash.clone()).collect::<Vec<_>>();
    assert_eq!(hashes(&m2), hashes(&m));
}

/// Uploads one file to `s3://…/prefix/NAME` with the AWS CLI-free object_store path: publish a
/// tiny directory holding it through the same S3 credentials.
fn publish_raw(file: &std::path::Path, prefix: &str) -> String {
    use object_store::ObjectStoreExt;
    let rest = prefix.strip_prefix("s3://").unwrap();
    let (bucket, key) = rest.split_once('/').unwrap();
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let store = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let path = object_store::path::Path::from(format!("{key}/{name}"));
    rt.block_on(store.put(&path, std::fs::read(file).unwrap().into())).unwrap();
    format!("s3://{bucket}/{key}/{name}")
}

#[test]
fn bad_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = byte_tokenizer(dir.path());
    let good = dir.path().join("good.parquet");
    write_parquet(&good, &docs("g", 100), 50);
    let bytes = std::fs::read(&good).unwrap();
    let out = |name: &str| dir.path().join(name);
    let err_of =
        |inputs: Vec<String>, name: &str| run(&config(inputs, &out(name), &tokenizer, 4096)).unwrap_err().to_string();

    let truncated = dir.path().join("truncated.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(vec![truncated.display().to_string()], "o1");
    assert!(e.contains("truncated.parquet") && e.contains("parquet"), "{e}");

    let corrupt = dir.path().join("corrupt.parquet");
    let mut flipped = bytes.clone();
    for b in &mut flipped[8..bytes.len() / 2] {
        *b ^= 0x5a;
    }
    std::fs::write(&corrupt, &flipped).unwrap();
    let e = err_of(vec![corrupt.display().to_string()], "o2");
    assert!(e.contains("corrupt.parquet"), "{e}");

    let mut c = config(vec![good.display().to_string()], &out("o3"), &tokenizer, 4096);
    c.columns.text = "content".into();
    let e = run(&c).unwrap_err().to_string();
    assert!(e.contains("\"content\"") && e.contains("text, id, url, score") && e.contains("--text-column"), "{e}");

    let e = err_of(vec![dir.path().join("nowhere").display().to_string()], "o4");
    assert!(e.contains("nowhere"), "{e}");

    // Rows of invalid UTF-8 are skipped and counted, or refused by flag.
    let mixed = dir.path().join("mixed.parquet");
    let mut rows: Vec<Vec<u8>> = docs("m", 60).into_iter().map(|d| d.text.into_bytes()).collect();
    rows[7] = vec![b'o', b'k', 0xff, 0xfe];
    let refs: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
    write_binary_parquet(&mixed, &refs);
    let (m, _) = run(&config(vec![mixed.display().to_string()], &out("o5"), &tokenizer, 4096)).unwrap();
    assert_eq!((m.stats.invalid_utf8, m.stats.documents_read), (1, 60));
    let mut refuse = config(vec![mixed.display().to_string()], &out("o6"), &tokenizer, 4096);
    refuse.refuse_invalid_utf8 = true;
    let e = run(&refuse).unwrap_err().to_string();
    assert!(e.contains("mixed.parquet") && e.contains("row 7") && e.contains("UTF-8"), "{e}");
    // Invalid bytes in a column annotated as a string (as FineWeb's text is) break the file's
    // own promise: the parquet decoder checks a batch at a time, and the file is refused with
    // an error that names it, not a panic and not a silently shorter dataset.
    let labelled = dir.path().join("labelled.parquet");
    write_mislabelled_parquet(&labelled, &refs);
    let e = run(&config(vec![labelled.display().to_string()], &out("o5s"), &tokenizer, 4096)).unwrap_err().to_string();
    assert!(e.contains("labelled.parquet") && e.to_lowercase().contains("utf"), "{e}");

    // A server that stops answering mid-file: retried, then an error naming the input.
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    write_parquet(&served.join("big.parquet"), &docs("u", 2000), 100);
    let server = serve(&served);
    *server.fail_after.lock().unwrap() = Some(("big.parquet".into(), 6));
    let e = err_of(vec![server.url("big.parquet")], "o7");
    assert!(e.contains("big.parquet") && e.contains("503"), "{e}");
    let retried = server.requests().iter().filter(|l| l.contains("big.parquet")).count();
    assert!(retried > 7, "the failing reads were retried: {retried}");

    // Too little text for both splits.
    let tiny = dir.path().join("tiny.txt");
    std::fs::write(&tiny, "one short document").unwrap();
    let e = err_of(vec![tiny.display().to_string()], "o8");
    assert!(e.contains("too little text"), "{e}");
}

#[test]
fn a_real_tokenizer_prepares_with_its_own_end_of_text() {
    let Some(dir) = std::env::var_os("TESSERA_TOKENIZERS") else {
        assert!(std::env::var_os("TESSERA_TEST_REQUIRE_SERVICES").is_none(), "TESSERA_TOKENIZERS is not set");
        return;
    };
    let llama = std::path::Path::new(&dir).join("llama3").join("tokenizer.json");
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.parquet");
    write_parquet(&input, &docs("l", 200), 100);
    let out = tmp.path().join("out");
    let (m, _) = run(&config(vec![input.display().to_string()], &out, &llama, 2048)).unwrap();
    assert_eq!(
        (m.tokenizer.eos_token.as_str(), m.tokenizer.eos_id, m.tokenizer.vocab_size),
        ("<|end_of_text|>", 128001, 128256)
    );
    let ds = Dataset::from_manifest(&out).unwrap();
    let first = ds.train.split(|&t| t == 128001).next().unwrap();
    let text = ds.tokenizer.decode(first).unwrap();
    assert!(text.starts_with("Document l-"), "{text}");
    assert_eq!(TessTokenizer::load(&out.join("tokenizer.json")).unwrap().vocab_size(), 128256);
}
