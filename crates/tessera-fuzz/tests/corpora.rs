//! Replays every kept fuzz input (`fuzz/corpus/TARGET/*`, crashes found once included) and
//! random inputs through every target: none may panic. Runs on stable, without libFuzzer.

use std::path::Path;

use proptest::prelude::*;

#[test]
fn every_kept_input_is_refused_or_accepted_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut replayed = 0;
    for (name, target) in tessera_fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut here = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&bytes));
            assert!(outcome.is_ok(), "{name}: {} panicked", path.display());
            here += 1;
        }
        assert!(here > 0, "{}: no corpus kept for {name}", dir.display());
        replayed += here;
    }
    eprintln!("replayed {replayed} kept inputs");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn random_inputs_do_not_panic(target in 0..tessera_fuzz::TARGETS.len(), bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        (tessera_fuzz::TARGETS[target].1)(&bytes);
    }
}
