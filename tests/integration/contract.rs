//! The fault table and the gateway-error table are the single source of truth: the proto's enum
//! comments, the README's error tables and the typed clients' copies must say what they say,
//! retry advice and whether the controller may have acted included.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_types::FileDescriptorSet;

use taskgate::fault::{FAULTS, FaultClass, classify, grpc_code_name};
use taskgate::gateway_error::GATEWAY_ERRORS;
use taskgate::proto::FILE_DESCRIPTOR_SET;

/// Field numbers in descriptor.proto, used to address comments in `SourceCodeInfo`.
const FILE_ENUM_TYPE: i32 = 5;
const ENUM_VALUE: i32 = 2;

#[test]
fn every_fault_code_comment_in_the_proto_is_the_table_meaning_and_retry_advice() {
    let descriptor_set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).unwrap();
    let file = descriptor_set
        .file
        .iter()
        .find(|file| file.name() == "taskgate/v1/task.proto")
        .unwrap();
    let (enum_index, fault_code) = file
        .enum_type
        .iter()
        .enumerate()
        .find(|(_, enumeration)| enumeration.name() == "FaultCode")
        .unwrap();
    let locations = &file.source_code_info.as_ref().unwrap().location;
    for fault in FAULTS {
        let name = format!("FAULT_CODE_{}", fault.name);
        let value_index = fault_code
            .value
            .iter()
            .position(|value| value.name() == name)
            .unwrap_or_else(|| panic!("{name} is not in the proto"));
        let path = [
            FILE_ENUM_TYPE,
            enum_index as i32,
            ENUM_VALUE,
            value_index as i32,
        ];
        let comment = locations
            .iter()
            .find(|location| location.path == path)
            .and_then(|location| location.leading_comments.clone())
            .unwrap_or_else(|| panic!("{name} has no comment"));
        let comment = comment.split_whitespace().collect::<Vec<_>>().join(" ");
        let expected = format!("{} Retry advice: {}.", fault.meaning, fault.retry.advice());
        assert_eq!(comment, expected, "the proto comment of {name}");
    }
}

/// The README's error table, generated from the fault table: a row per known fault, then the rows
/// of the codes it does not list. When this fails, paste the expected rows it prints into the
/// README.
#[test]
fn the_readme_error_table_matches_the_fault_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let row = |code: String, fault_class: FaultClass| {
        format!(
            "| {code} | `{}` | `{}` | {} | {} | {} |",
            fault_class.reason(),
            grpc_code_name(fault_class.grpc_code()),
            yes_or_no(fault_class.retry().controller_may_have_acted()),
            fault_class.retry().advice(),
            fault_class.meaning()
        )
    };
    let mut rows: Vec<String> = FAULTS
        .iter()
        .map(|fault| row(fault.code.to_string(), FaultClass::Known(fault)))
        .collect();
    rows.push(row("1000–1999, unlisted".to_owned(), classify(1005)));
    rows.push(row("any other".to_owned(), classify(2000)));
    let missing: Vec<&String> = rows
        .iter()
        .filter(|row| !readme.contains(row.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's error table is out of date; expected rows:\n{}",
        rows.join("\n")
    );
}

/// The README's "Gateway errors" table, row for row and in order, is the gateway-error table.
/// When this fails, paste the expected rows it prints into the README.
#[test]
fn the_readme_gateway_error_table_is_the_gateway_error_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (_, section) = readme
        .split_once("**Gateway errors**")
        .expect("README.md has no **Gateway errors** table");
    let table: Vec<&str> = section
        .lines()
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        // The heading and the line under it.
        .skip(2)
        .collect();
    let expected: Vec<String> = GATEWAY_ERRORS
        .iter()
        .map(|row| {
            format!(
                "| `{}` | `{}` | {} | {} | {} |",
                row.reason,
                grpc_code_name(row.code),
                row.when,
                yes_or_no(row.retry.controller_may_have_acted()),
                row.retry.advice()
            )
        })
        .collect();
    assert!(
        table == expected,
        "README.md's gateway error table is out of date; expected rows:\n{}",
        expected.join("\n")
    );
}

/// The README's "Controller may have acted?" column.
fn yes_or_no(controller_may_have_acted: bool) -> &'static str {
    if controller_may_have_acted {
        "yes"
    } else {
        "no"
    }
}

/// A typed client's copy of the gateway errors a repeat with the same key cannot settle, its
/// `repeat_settles` exceptions.
struct UnsettledCopy {
    /// The client's source file.
    file: &'static str,
    /// The line that opens the literal.
    opening: &'static str,
    /// How the client spells a gRPC code, from its gateway name (`FAILED_PRECONDITION`).
    spell: fn(&str) -> String,
}

/// The copies in the three typed clients.
const UNSETTLED_COPIES: [UnsettledCopy; 3] = [
    UnsettledCopy {
        file: "clients/python/taskgate_client/__init__.py",
        opening: "_UNSETTLED_ROWS = frozenset({",
        spell: |name| format!("grpc.StatusCode.{name}"),
    },
    UnsettledCopy {
        file: "clients/node/client.js",
        opening: "const UNSETTLED_ROWS = new Map([",
        spell: |name| format!("grpc.status.{name}"),
    },
    UnsettledCopy {
        file: "clients/go/error.go",
        opening: "var unsettledRows = map[string]codes.Code{",
        spell: go_code,
    },
];

/// The clients copy the unsettled rows by hand (each decides `repeat_settles` offline), so a row
/// added to or changed in the gateway's table must reach all three. A copy is read from the
/// line that opens its literal to the first line that closes a bracket, one row a line: the
/// first double-quoted string is the reason, the last token the code.
#[test]
fn each_client_names_exactly_the_gateway_errors_a_repeat_cannot_settle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for UnsettledCopy {
        file,
        opening,
        spell,
    } in UNSETTLED_COPIES
    {
        let expected: BTreeSet<(String, String)> = GATEWAY_ERRORS
            .iter()
            .filter(|row| row.retry.unsettled())
            .map(|row| (row.reason.to_owned(), spell(grpc_code_name(row.code))))
            .collect();
        assert!(!expected.is_empty(), "the gateway has no unsettled rows");
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        let copied: BTreeSet<(String, String)> = source
            .lines()
            .skip_while(|line| line.trim() != opening)
            .skip(1)
            .take_while(|line| !line.trim_start().starts_with(['}', ']', ')']))
            .map(|line| {
                let reason = line.split('"').nth(1).unwrap_or_else(|| {
                    panic!("{file}: a row of `{opening}` has no quoted reason: {line:?}")
                });
                let code = line.trim().trim_end_matches([',', ')', ']']);
                let code = code.rsplit([' ', ',']).next().unwrap();
                (reason.to_owned(), code.to_owned())
            })
            .collect();
        let missing: Vec<_> = expected.difference(&copied).collect();
        let extra: Vec<_> = copied.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{file} (`{opening}`) is not the gateway's unsettled rows: missing {missing:?}, extra {extra:?}"
        );
    }
}

/// grpc-go's name of a gRPC code, from its gateway name: `codes.FailedPrecondition`.
fn go_code(name: &str) -> String {
    // grpc-go spells CANCELLED the American way.
    if name == "CANCELLED" {
        return "codes.Canceled".to_owned();
    }
    let words: String = name
        .split('_')
        .map(|word| word[..1].to_owned() + &word[1..].to_lowercase())
        .collect();
    format!("codes.{words}")
}

/// Every source file says what it is for before anything else (rust-analyzer's `TidyDocs`).
/// The folders are walked, not listed, so files in new folders are checked too.
#[test]
fn every_source_file_opens_with_a_module_doc() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for folder in ["src", "tests", "benches", "examples"] {
        rust_files(&root.join(folder), &mut files);
    }
    // A walk that found nothing, or did not go down into folders, would check nothing.
    assert!(files.contains(&root.join("src/lib.rs")), "{files:?}");
    assert!(
        files.contains(&root.join("tests/integration/main.rs")),
        "{files:?}"
    );
    let missing: Vec<String> = files
        .iter()
        .filter(|path| !std::fs::read_to_string(path).unwrap().starts_with("//!"))
        .map(|path| path.display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! doc: {missing:?}");
}

/// Adds every `.rs` file under `folder`, at any depth, to `files`; a missing folder adds none.
fn rust_files(folder: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
}
