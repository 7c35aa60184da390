//! The DICOM Part 10 file header that precedes each stored data set in the spool.
//!
//! Storing objects as Part 10 files means `spool export` and the DICOMweb uplink (STOW-RS
//! wants `application/dicom` Part 10) use the stored bytes as they are.

use dicom_object::FileMetaTableBuilder;

/// This implementation's class UID (a UUID-derived 2.25 root) and version name.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.310057779101572763035698445821700708640";
pub const IMPLEMENTATION_VERSION_NAME: &str = "GATEWAYD_0_1";

/// Why a Part 10 header cannot be written for an object.
#[derive(Debug, thiserror::Error)]
pub enum Part10Error {
    /// The UIDs do not make a valid file meta group.
    #[error("cannot build the file meta group (transfer syntax {transfer_syntax}): {source}")]
    Meta {
        transfer_syntax: String,
        #[source]
        source: Box<dicom_object::meta::Error>,
    },
    /// The file meta group cannot be encoded.
    #[error("cannot encode the file meta group (transfer syntax {transfer_syntax}): {source}")]
    Encode {
        transfer_syntax: String,
        #[source]
        source: Box<dicom_object::meta::Error>,
    },
}

/// Preamble, `DICM` and the file meta group for one object. The transfer syntax is the one
/// the data set arrived in: the gateway never transcodes.
pub fn header(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    transfer_syntax_uid: &str,
) -> Result<Vec<u8>, Part10Error> {
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class_uid)
        .media_storage_sop_instance_uid(sop_instance_uid)
        .transfer_syntax(transfer_syntax_uid)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .build()
        .map_err(|source| Part10Error::Meta {
            transfer_syntax: transfer_syntax_uid.to_string(),
            source: Box::new(source),
        })?;
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).map_err(|source| Part10Error::Encode {
        transfer_syntax: transfer_syntax_uid.to_string(),
        source: Box::new(source),
    })?;
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_back_as_a_file_meta_group() {
        let h = header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
        )
        .unwrap();
        assert_eq!(&h[128..132], b"DICM");
        let meta = dicom_object::FileMetaTable::from_reader(&h[128..]).unwrap();
        assert_eq!(meta.media_storage_sop_instance_uid(), "1.2.3.4");
        assert_eq!(meta.transfer_syntax(), "1.2.840.10008.1.2.1");
        assert_eq!(meta.implementation_class_uid(), IMPLEMENTATION_CLASS_UID);
    }
}
