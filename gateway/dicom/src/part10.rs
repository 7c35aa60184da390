//! The DICOM Part 10 file header that precedes each stored data set in the spool.
//!
//! Storing objects as Part 10 files means `spool export` and the DICOMweb uplink (STOW-RS
//! wants `application/dicom` Part 10) use the stored bytes as they are. [`read`] goes the
//! other way for the C-STORE SCU ([`crate::scu`]): the UIDs of the file meta group and
//! where the data set starts.

use dicom_object::FileMetaTableBuilder;

use crate::element::{self, Encoding};

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
    /// The bytes are not a Part 10 file this reader understands.
    #[error("not a DICOM Part 10 file: {reason}")]
    Read { reason: &'static str },
}

/// What a Part 10 file says about its data set (UIDs trimmed of padding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part10Meta {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    /// Offset of the data set: the first byte after the file meta group.
    pub data_set_offset: usize,
}

/// Reads the file meta group (always Explicit VR Little Endian, PS3.10 7.1) of a Part 10
/// file: preamble, `DICM`, group 0002 elements up to the first element of another group.
pub fn read(bytes: &[u8]) -> Result<Part10Meta, Part10Error> {
    const PREFIX: usize = 132;
    if bytes.get(128..PREFIX) != Some(b"DICM".as_slice()) {
        return Err(Part10Error::Read {
            reason: "no DICM prefix",
        });
    }
    let (mut class, mut instance, mut ts) = (None, None, None);
    let mut pos = PREFIX;
    loop {
        let Some(header) = element::read_header_at(bytes, pos, Encoding::EXPLICIT_LE) else {
            // A file of a file meta group and no data set.
            if pos == bytes.len() {
                break;
            }
            return Err(Part10Error::Read {
                reason: "truncated file meta group",
            });
        };
        if header.group != 0x0002 {
            break;
        }
        let start = pos + header.header_len;
        let end = start
            .checked_add(header.len as usize)
            .filter(|_| header.len != element::UNDEFINED_LENGTH)
            .ok_or(Part10Error::Read {
                reason: "file meta element of undefined length",
            })?;
        let value = bytes.get(start..end).ok_or(Part10Error::Read {
            reason: "truncated file meta group",
        })?;
        let text = || {
            std::str::from_utf8(value)
                .ok()
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty())
        };
        match header.element {
            0x0002 => class = text(),
            0x0003 => instance = text(),
            0x0010 => ts = text(),
            _ => {}
        }
        pos = end;
    }
    Ok(Part10Meta {
        sop_class_uid: class.ok_or(Part10Error::Read {
            reason: "no Media Storage SOP Class UID",
        })?,
        sop_instance_uid: instance.ok_or(Part10Error::Read {
            reason: "no Media Storage SOP Instance UID",
        })?,
        transfer_syntax_uid: ts.ok_or(Part10Error::Read {
            reason: "no Transfer Syntax UID",
        })?,
        data_set_offset: pos,
    })
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

    #[test]
    fn read_finds_the_uids_and_the_data_set_after_the_header() {
        let mut file = header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.4",
            "1.2.840.10008.1.2.1",
        )
        .unwrap();
        let header_len = file.len();
        file.extend([0x08, 0x00, 0x16, 0x00, b'U', b'I', 2, 0, b'1', 0]);
        let meta = read(&file).unwrap();
        assert_eq!(meta.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(meta.sop_instance_uid, "1.2.3.4");
        assert_eq!(meta.transfer_syntax_uid, "1.2.840.10008.1.2.1");
        assert_eq!(meta.data_set_offset, header_len);
        for cut in [0, 100, 131, 140, header_len - 3] {
            assert!(read(&file[..cut]).is_err(), "cut at {cut}");
        }
    }
}
