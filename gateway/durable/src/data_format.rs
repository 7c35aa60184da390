//! The data format version of the state partition (`<data_dir>/FORMAT`).
//!
//! Firmware slots change under a box's data: an A/B update boots a newer gatewayd on the same
//! spool, keys and configuration, and a rollback boots the older one again. The file holds one
//! decimal number, the layout version of everything under the data directory. A gatewayd
//! refuses to start on a format newer than [`CURRENT`] (it would misread or damage data it does
//! not know), writes [`CURRENT`] on a data directory that has no file yet, and a newer firmware
//! migrates (and raises the number) only once its slot is marked good, so a rollback never meets
//! a format it cannot read.

use std::path::{Path, PathBuf};

/// The data format this build reads and writes.
pub const CURRENT: u32 = 1;

/// The file's name under the data directory.
pub const FILE_NAME: &str = "FORMAT";

/// Why the data format cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataFormatError {
    /// The data was written by a newer firmware.
    #[error(
        "{path} says data format {found}, newer than this firmware's {known}: this firmware \
         cannot read the data (roll back to the firmware that wrote it, or update)"
    )]
    Newer {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    /// The file is not one decimal number.
    #[error("{path} is not a data format number")]
    Corrupt { path: PathBuf },
    /// File system failure.
    #[error(transparent)]
    Io(#[from] crate::Error),
}

/// The data format recorded under `data_dir`, or `None` when there is no file yet.
pub fn read(data_dir: &Path) -> Result<Option<u32>, DataFormatError> {
    let path = data_dir.join(FILE_NAME);
    let Some(bytes) = crate::read_if_exists(&path)? else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map(Some)
        .ok_or(DataFormatError::Corrupt { path })
}

/// Checks the data format at start: refuses a newer one, writes [`CURRENT`] (durably) when the
/// data directory has none yet. Returns the format in use.
pub fn check_or_init(data_dir: &Path) -> Result<u32, DataFormatError> {
    match read(data_dir)? {
        Some(found) if found > CURRENT => Err(DataFormatError::Newer {
            path: data_dir.join(FILE_NAME),
            found,
            known: CURRENT,
        }),
        Some(found) => Ok(found),
        None => {
            crate::write_atomic(&data_dir.join(FILE_NAME), format!("{CURRENT}\n").as_bytes())?;
            Ok(CURRENT)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_dir_gets_the_current_format_and_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        assert_eq!(check_or_init(dir.path()).expect("init"), CURRENT);
        assert_eq!(read(dir.path()).expect("read"), Some(CURRENT));
        assert_eq!(check_or_init(dir.path()).expect("again"), CURRENT);
    }

    #[test]
    fn a_newer_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), format!("{}\n", CURRENT + 1)).expect("write");
        let err = check_or_init(dir.path()).expect_err("newer format must be refused");
        assert!(matches!(err, DataFormatError::Newer { found, .. } if found == CURRENT + 1));
        assert!(err.to_string().contains("newer than this firmware"));
        assert_eq!(read(dir.path()).expect("read"), Some(CURRENT + 1));
    }

    #[test]
    fn a_garbled_file_is_corrupt_not_a_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), "one\n").expect("write");
        assert!(matches!(
            check_or_init(dir.path()),
            Err(DataFormatError::Corrupt { .. })
        ));
    }
}
