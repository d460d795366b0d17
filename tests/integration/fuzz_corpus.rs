//! The fuzz targets' committed corpora, replayed on stable through the very checks the targets
//! run (`taskgate::fuzz_api`), so CI keeps every seed and every crash once found passing without
//! nightly or libFuzzer (issue 11). `scripts/fuzz` does the fuzzing itself.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use taskgate::fuzz_api::TARGETS;

/// Seeds are kept to a few KB per target, so the repository and this replay stay small.
const MAX_CORPUS_BYTES: u64 = 16 * 1024;

fn fuzz_folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files in `folder`, sorted so a failure names the same file every run.
fn files_in(folder: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", folder.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_fuzz_input_passes_its_check() {
    let mut failures = Vec::new();
    for target in TARGETS {
        let folder = fuzz_folder().join("corpus").join(target.name);
        let files = files_in(&folder);
        assert!(!files.is_empty(), "{} has no seeds", folder.display());
        let mut total = 0;
        for path in files {
            let input = std::fs::read(&path).unwrap();
            total += input.len() as u64;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.check)(&input))) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{}: {message}", path.display()));
            }
        }
        assert!(
            total <= MAX_CORPUS_BYTES,
            "{} holds {total} bytes; minimise it (cargo +nightly fuzz cmin {}) below {MAX_CORPUS_BYTES}",
            folder.display(),
            target.name
        );
    }
    assert!(
        failures.is_empty(),
        "failing inputs:\n{}",
        failures.join("\n")
    );
}

/// Every target file calls its own check, and every check has a target: a target added on one
/// side only would go unfuzzed or unreplayed.
#[test]
fn the_fuzz_targets_and_the_checks_match() {
    let files = files_in(&fuzz_folder().join("fuzz_targets"));
    let mut names: Vec<String> = files
        .iter()
        .map(|path| path.file_stem().unwrap().to_str().unwrap().to_owned())
        .collect();
    names.sort();
    let mut checks: Vec<&str> = TARGETS.iter().map(|target| target.name).collect();
    checks.sort();
    assert_eq!(names, checks);
    let manifest = std::fs::read_to_string(fuzz_folder().join("Cargo.toml")).unwrap();
    for (path, name) in files.iter().zip(&names) {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.contains(&format!("taskgate::fuzz_api::{name}(data)")),
            "{} does not call fuzz_api::{name}",
            path.display()
        );
        assert!(
            manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")),
            "fuzz/Cargo.toml has no [[bin]] for {name}"
        );
    }
}
