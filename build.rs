//! Compiles `proto/` with protox (pure Rust, so no `protoc` is needed), generates the tonic client
//! and server, and writes the encoded descriptor set that reflection and the contract tests read.
//! Lists the operator console's committed bundle (`console/dist/`) for `include_bytes!`, so the
//! binary carries it and `cargo build` needs no Node.

use std::{env, error::Error, fs, path::PathBuf};

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
    list_console_files(&out_dir)?;
    Ok(())
}

/// Writes `console_files.rs`: one `(name, bytes)` entry per file of `console/dist/`, by name,
/// each read with `include_bytes!` so that a change to the bundle rebuilds the binary.
fn list_console_files(out_dir: &std::path::Path) -> Result<(), Box<dyn Error>> {
    let dist = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("console/dist");
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
