//! Reading a file an operator names (tokens, certificates, settings, layouts): regular files
//! only, and not past a size no such file comes near. A FIFO given by mistake would otherwise
//! hang startup (or a SIGHUP reload) until something writes to it, and `/dev/zero` would be read
//! until memory ran out.

use std::fs::{File, FileType, Metadata};
use std::io::Read as _;
use std::path::Path;

/// The largest file read: every file the gateway reads is a few kilobytes of text.
const MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Why a file cannot be read. It never names the path: the caller does, with what the file was
/// for.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The OS refused to open or read it.
    #[error("{0}")]
    Io(std::io::Error),
    /// It is a directory, a FIFO, a device or a socket.
    #[error("it is {0}, not a regular file")]
    NotRegular(&'static str),
    /// It is larger than 16 MiB.
    #[error("it is larger than {MAX_BYTES} bytes, far more than such a file holds")]
    TooLarge,
    /// It is not UTF-8 text.
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

impl From<std::io::Error> for FileError {
    fn from(error: std::io::Error) -> Self {
        FileError::Io(error)
    }
}

/// Reads a regular file whole.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    // Checked before opening, since opening a FIFO for reading blocks until a writer comes.
    check(&std::fs::metadata(path)?)?;
    let file = File::open(path)?;
    // Checked again on what was opened, in case the path changed in between. A FIFO swapped in
    // at that very moment would still block the open; only someone who can already rewrite the
    // gateway's files could do that.
    check(&file.metadata()?)?;
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(FileError::TooLarge);
    }
    Ok(bytes)
}

/// Reads a regular file of UTF-8 text whole.
pub fn read_to_string(path: &Path) -> Result<String, FileError> {
    String::from_utf8(read(path)?).map_err(|_| FileError::NotUtf8)
}

fn check(metadata: &Metadata) -> Result<(), FileError> {
    if metadata.is_file() {
        Ok(())
    } else {
        Err(FileError::NotRegular(kind(metadata.file_type())))
    }
}

/// What a file that is not a regular file is, in words.
fn kind(file_type: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if file_type.is_fifo() {
            return "a FIFO";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else {
        "something other than a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &Path, expected: Result<&[u8], &str>) {
        let outcome = read(path).map_err(|error| error.to_string());
        assert_eq!(
            outcome.as_deref().map_err(String::as_str),
            expected,
            "{}",
            path.display()
        );
    }

    #[test]
    fn only_regular_files_are_read() {
        let folder =
            std::env::temp_dir().join(format!("taskgate-regular-file-{}", std::process::id()));
        std::fs::create_dir_all(&folder).unwrap();
        let file = folder.join("tokens");
        std::fs::write(&file, "a-token\n").unwrap();
        check(&file, Ok(b"a-token\n"));
        check(&folder, Err("it is a directory, not a regular file"));
        #[cfg(unix)]
        check(
            Path::new("/dev/zero"),
            Err("it is a character device, not a regular file"),
        );
        std::fs::write(&file, [0xff_u8]).unwrap();
        assert!(matches!(read_to_string(&file), Err(FileError::NotUtf8)));
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
