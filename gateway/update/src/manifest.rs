//! The signed metadata inside a bundle, `gateway-update.json`, and the RAUC pre-install
//! check (`gatewayd update pre-install`).
//!
//! ```json
//! {"version": 8, "min_version": 7, "data_format": 1, "roothash": "…", "data_blocks": 1, "hash_offset": 1}
//! ```
//!
//! The file is inside the bundle's verity-protected squashfs, so RAUC has verified it when
//! the handler runs (`RAUC_BUNDLE_MOUNT_POINT`). The check refuses, printing
//! [`crate::installer::REFUSAL_MARKER`] and the code so `rauc install`'s caller can tell:
//! `version-mismatch` (the file's version is not the manifest's `RAUC_MF_VERSION`, or
//! `min_version` is above `version`), `downgrade` (version below the box's floor),
//! `data-format` (the bundle's firmware reads an older data format than the box holds: it
//! could not read this box's data). On success the file is copied to
//! `<data_dir>/update/bundle-meta.json` for the floor raise after the health check.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Failure;

/// The bundle's signed metadata (unknown fields, e.g. the verity parameters, are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMeta {
    pub version: u64,
    pub min_version: u64,
    pub data_format: u32,
}

/// The file's name at the bundle's root.
pub const FILE_NAME: &str = "gateway-update.json";

impl BundleMeta {
    pub fn parse(bytes: &[u8]) -> Result<BundleMeta, Failure> {
        serde_json::from_slice(bytes).map_err(|e| {
            Failure::new(
                "install-failed",
                format!(
                    "{FILE_NAME} is not valid (line {} column {})",
                    e.line(),
                    e.column()
                ),
            )
        })
    }

    /// Reads a copy (`None` when absent).
    pub fn load(path: &Path) -> Result<Option<BundleMeta>, Failure> {
        match gateway_durable::read_if_exists(path) {
            Ok(Some(bytes)) => BundleMeta::parse(&bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(Failure::new("install-failed", e.to_string())),
        }
    }
}

/// The pre-install decision, pure: `mf_version` is RAUC's `RAUC_MF_VERSION`, `floor` the
/// box's version floor, `box_format` the data format under the data directory (`None`: a
/// box without a FORMAT file yet, i.e. format 1).
pub fn check(
    meta: &BundleMeta,
    mf_version: &str,
    floor: u64,
    box_format: Option<u32>,
) -> Result<(), Failure> {
    if mf_version.trim().parse::<u64>().ok() != Some(meta.version) {
        return Err(Failure::new(
            "version-mismatch",
            format!(
                "{FILE_NAME} says version {}, the manifest {}",
                meta.version,
                crate::clip(mf_version)
            ),
        ));
    }
    if meta.min_version > meta.version {
        return Err(Failure::new(
            "version-mismatch",
            format!(
                "min_version {} is above version {}",
                meta.min_version, meta.version
            ),
        ));
    }
    if meta.version < floor {
        return Err(Failure::new(
            "downgrade",
            format!("version {} is below this box's floor {floor}", meta.version),
        ));
    }
    let box_format = box_format.unwrap_or(1);
    if meta.data_format < box_format {
        return Err(Failure::new(
            "data-format",
            format!(
                "the bundle's firmware reads data format {}, this box holds format {box_format}",
                meta.data_format
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: u64, min_version: u64, data_format: u32) -> BundleMeta {
        BundleMeta {
            version,
            min_version,
            data_format,
        }
    }

    #[test]
    fn pre_install_refuses_downgrade_older_data_format_and_mismatched_versions() {
        assert!(check(&meta(8, 7, 1), "8", 7, Some(1)).is_ok());
        assert!(check(&meta(8, 8, 2), "8", 8, None).is_ok());
        assert_eq!(
            check(&meta(6, 6, 1), "6", 7, Some(1)).unwrap_err().code,
            "downgrade"
        );
        assert_eq!(
            check(&meta(8, 7, 1), "8", 0, Some(2)).unwrap_err().code,
            "data-format"
        );
        assert_eq!(
            check(&meta(8, 7, 1), "9", 0, Some(1)).unwrap_err().code,
            "version-mismatch"
        );
        assert_eq!(
            check(&meta(8, 7, 1), "x", 0, Some(1)).unwrap_err().code,
            "version-mismatch"
        );
        assert_eq!(
            check(&meta(8, 9, 1), "8", 0, Some(1)).unwrap_err().code,
            "version-mismatch"
        );
    }

    #[test]
    fn metadata_parses_and_ignores_the_verity_fields() {
        let m = BundleMeta::parse(br#"{"version":8,"min_version":7,"data_format":1,"roothash":"ab","data_blocks":3,"hash_offset":4}"#).unwrap();
        assert_eq!(m, meta(8, 7, 1));
        assert!(BundleMeta::parse(b"{\"version\":8}").is_err());
    }
}
