//! Hostile input files: any mangled parquet or JSONL ends in a result or an error naming the
//! file, never a panic or a hang.

mod common;

use common::*;
use proptest::prelude::*;
use tessera_prepare::prepare;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mangled_parquet_never_panics(at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in 0usize..64) {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.parquet");
        write_parquet(&good, &docs("p", 40), 16);
        let mut bytes = std::fs::read(&good).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(bytes.len() - cut.min(bytes.len()));
        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, &bytes).unwrap();
        let tokenizer = byte_tokenizer(dir.path());
        let config = config(vec![bad.display().to_string()], &dir.path().join("out"), &tokenizer, 4096);
        if let Err(e) = prepare(&config, &mut |_| {}) {
            let e = e.to_string();
            prop_assert!(e.contains("bad.parquet") || e.contains("too little"), "{}", e);
        }
    }

    #[test]
    fn arbitrary_jsonl_never_panics(lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..30)) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.jsonl");
        std::fs::write(&file, lines.join(&b'\n')).unwrap();
        let tokenizer = byte_tokenizer(dir.path());
        let config = config(vec![file.display().to_string()], &dir.path().join("out"), &tokenizer, 4096);
        if let Err(e) = prepare(&config, &mut |_| {}) {
            let e = e.to_string();
            prop_assert!(e.contains("x.jsonl") || e.contains("too little"), "{}", e);
        }
    }
}
