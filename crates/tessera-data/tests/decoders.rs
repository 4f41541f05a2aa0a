//! Outside bytes into the data layer's decoders: text files, JSONL, tokenizer files, prepared
//! directories. Whatever they hold, the result is a value or an error, never a panic.

use proptest::prelude::*;
use tessera_data::{Dataset, Manifest, TessTokenizer, TextSource};

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_and_jsonl_files_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), jsonl in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(if jsonl { "x.jsonl" } else { "x.txt" });
        std::fs::write(&path, &bytes).unwrap();
        let _ = TextSource::read(&path);
    }

    #[test]
    fn jsonl_lines_of_any_shape_never_panic(lines in proptest::collection::vec("\\{\"text\": ?[\\PC]{0,20}\\}?|\\PC{0,30}", 0..8)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        std::fs::write(&path, lines.join("\n")).unwrap();
        if let Ok(docs) = TextSource::read(&path) {
            let _ = Dataset::from_documents("p", &docs, TessTokenizer::byte_level());
        }
    }

    #[test]
    fn arbitrary_tokenizer_files_never_panic(text in "\\PC{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, &text).unwrap();
        prop_assert!(TessTokenizer::load(&path).is_err());
    }

    #[test]
    fn mangled_tokenizer_json_never_panics(cut in 0usize..2000, at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        TessTokenizer::char_level("hello world").save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(bytes.len().saturating_sub(cut));
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(t) = TessTokenizer::load(&path) {
            let _ = t.encode("hello there");
        }
    }

    #[test]
    fn prepared_dirs_with_mangled_manifests_never_panic(manifest in "\\PC{0,80}") {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::from_documents("m", &["abcdefgh".repeat(20)], TessTokenizer::char_level("abcdefgh")).unwrap();
        ds.write_manifest(dir.path(), 50).unwrap();
        std::fs::write(dir.path().join("manifest.json"), &manifest).unwrap();
        let _ = Dataset::from_manifest(dir.path());
    }

    #[test]
    fn manifests_with_a_mangled_byte_never_panic(at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::from_documents("m", &["abcdefgh".repeat(20)], TessTokenizer::char_level("abcdefgh")).unwrap();
        let (m, _) = ds.write_manifest(dir.path(), 50).unwrap();
        let mut bytes = m.to_bytes();
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok((parsed, _)) = Manifest::parse(&bytes) {
            prop_assert!(parsed.check().is_ok());
        }
        std::fs::write(dir.path().join("manifest.json"), &bytes).unwrap();
        let _ = Dataset::from_manifest(dir.path());
    }
}
