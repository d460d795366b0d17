//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed), generates the tonic client
//! and server, and writes the encoded descriptor set that reflection and the contract tests read.
//! Also names the commit being built, for `taskgate --version`, and lists the operator console's
//! committed bundle (`console/dist/`) for `include_bytes!`, so the binary carries it and `cargo
//! build` needs no Node.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, error::Error, fs};

fn main() -> Result<(), Box<dyn Error>> {
    let protos = ["taskgate/v1/task.proto"];
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(protos)?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("taskgate_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(compiler.file_descriptor_set())?;

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    println!("cargo:rerun-if-env-changed=TASKGATE_GIT_COMMIT");
    println!(
        "cargo:rustc-env=TASKGATE_GIT_COMMIT={}",
        git_commit(&manifest_dir)
    );
    list_console_files(&manifest_dir, &out_dir)?;
    Ok(())
}

/// Writes `console_files.rs`: one `(name, bytes)` entry per file of `console/dist/`, by name,
/// each read with `include_bytes!` so that a change to the bundle rebuilds the binary.
fn list_console_files(manifest_dir: &Path, out_dir: &Path) -> Result<(), Box<dyn Error>> {
    let dist = manifest_dir.join("console/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut names = Vec::new();
    for entry in fs::read_dir(&dist)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().into_string().map_err(|name| {
                format!("console/dist holds a file whose name is not UTF-8: {name:?}")
            })?;
            names.push(name);
        }
    }
    names.sort();
    let mut listing = String::from("&[\n");
    for name in names {
        let path = dist.join(&name);
        listing.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    listing.push_str("]\n");
    fs::write(out_dir.join("console_files.rs"), listing)?;
    Ok(())
}

/// The commit `taskgate --version` names: `TASKGATE_GIT_COMMIT` when set (a build from a copy of
/// the source without `.git`, such as a container's), else `git rev-parse --short HEAD` when
/// this crate is the top of a git checkout, else `unknown`: a tarball unpacked inside some other
/// repository must not be named after that repository's commit.
fn git_commit(manifest_dir: &Path) -> String {
    if let Ok(commit) = env::var("TASKGATE_GIT_COMMIT")
        && !commit.trim().is_empty()
    {
        return commit.trim().to_owned();
    }
    let toplevel = git(manifest_dir, &["rev-parse", "--show-toplevel"]);
    let is_checkout = toplevel.is_some_and(|toplevel| {
        fs::canonicalize(toplevel).ok() == fs::canonicalize(manifest_dir).ok()
    });
    if !is_checkout {
        return "unknown".to_owned();
    }
    // Built again when HEAD moves: HEAD itself, the branch it names, and the packed refs.
    let branch = git(manifest_dir, &["rev-parse", "--symbolic-full-name", "HEAD"]);
    for name in ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_owned)
        .chain(branch)
    {
        if let Some(path) = git(manifest_dir, &["rev-parse", "--git-path", &name])
            && manifest_dir.join(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(manifest_dir, &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}

/// What `git ARGS` prints, trimmed, when it succeeds.
fn git(directory: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(directory)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
