//! DIMSE command sets: decoding requests and encoding responses (PS3.7 section 9), and,
//! for the C-STORE SCU ([`crate::scu`]), encoding C-STORE-RQ and decoding C-STORE-RSP.
//!
//! Command sets are always Implicit VR Little Endian. Requests are decoded with
//! dicom-object; a command that does not decode, or lacks a mandatory field, is an error
//! the association answers with an A-ABORT (there is no message to respond to).

use dicom_core::{DataElement, PrimitiveValue, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

use crate::element::{self, Encoding};

/// Command Field values used here.
pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// DIMSE status codes the SCP answers with.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// C-FIND: Pending, matches are continuing (optional keys supported as given).
    pub const PENDING: u16 = 0xFF00;
    /// C-FIND: Cancel, matching terminated due to a C-CANCEL-RQ.
    pub const CANCEL: u16 = 0xFE00;
    /// Refused: SOP Class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Refused: Out of resources.
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: Data Set (C-FIND: Identifier) does not match SOP Class.
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Error: Cannot understand (C-FIND: Unable to process).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

const NO_DATA_SET: u16 = 0x0101;

/// Why a command set cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("command set does not decode")]
    Decode,
    #[error("command set lacks {0}")]
    Missing(&'static str),
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Echo {
        message_id: u16,
        sop_class_uid: String,
    },
    Store(StoreRequest),
    Find(FindRequest),
    /// C-CANCEL-RQ, naming the request it cancels when it says.
    Cancel {
        message_id: Option<u16>,
    },
    /// Any other command (C-MOVE, N-ACTION, ...): not offered by this SCP.
    Other {
        command_field: u16,
        message_id: Option<u16>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub message_id: u16,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub has_data_set: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FindRequest {
    pub message_id: u16,
    pub sop_class_uid: String,
    pub priority: u16,
    pub has_data_set: bool,
}

/// A decoded response (what the C-STORE SCU needs of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub command_field: u16,
    pub message_id_being_responded_to: u16,
    pub status: u16,
    /// Affected SOP Instance UID, when the response carries one.
    pub sop_instance_uid: Option<String>,
    pub has_data_set: bool,
}

/// Decodes a complete response command set (same bounded scan as [`decode`]).
pub fn decode_response(bytes: &[u8]) -> Result<Response, CommandError> {
    let fields = CommandFields::scan(bytes)?;
    Ok(Response {
        command_field: fields.u16(0x0100, "Command Field")?,
        message_id_being_responded_to: fields.u16(0x0120, "Message ID Being Responded To")?,
        status: fields.u16(0x0900, "Status")?,
        sop_instance_uid: fields.uid(0x1000, "Affected SOP Instance UID").ok(),
        has_data_set: fields
            .u16(0x0800, "Command Data Set Type")
            .is_ok_and(|t| t != NO_DATA_SET),
    })
}

/// Encodes a C-STORE-RQ with a data set following (priority medium).
pub fn store_request(message_id: u16, sop_class_uid: &str, sop_instance_uid: &str) -> Vec<u8> {
    encode(InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            uid_value(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_STORE_RQ]),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [message_id])),
        DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0000]),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            uid_value(sop_instance_uid),
        ),
    ]))
}

/// Decodes a complete command set.
///
/// Hand-written on purpose: dicom-object allocates whatever an element or item header
/// claims, so a few bytes claiming gigabytes exhausted memory under fuzzing
/// (fuzz/fuzz_targets/dimse_command.rs). A command set is flat Implicit VR Little Endian
/// group 0000, so a bounded scan over the received bytes is all it takes.
pub fn decode(bytes: &[u8]) -> Result<Request, CommandError> {
    let fields = CommandFields::scan(bytes)?;
    let command_field = fields.u16(0x0100, "Command Field")?;
    Ok(match command_field {
        field::C_ECHO_RQ => Request::Echo {
            message_id: fields.u16(0x0110, "Message ID")?,
            sop_class_uid: fields
                .uid(0x0002, "Affected SOP Class UID")
                .unwrap_or_else(|_| dicom_dictionary_std::uids::VERIFICATION.to_string()),
        },
        field::C_STORE_RQ => Request::Store(StoreRequest {
            message_id: fields.u16(0x0110, "Message ID")?,
            sop_class_uid: fields.uid(0x0002, "Affected SOP Class UID")?,
            sop_instance_uid: fields.uid(0x1000, "Affected SOP Instance UID")?,
            has_data_set: fields.u16(0x0800, "Command Data Set Type")? != NO_DATA_SET,
        }),
        field::C_FIND_RQ => Request::Find(FindRequest {
            message_id: fields.u16(0x0110, "Message ID")?,
            sop_class_uid: fields.uid(0x0002, "Affected SOP Class UID")?,
            priority: fields.u16(0x0700, "Priority").unwrap_or(0),
            has_data_set: fields.u16(0x0800, "Command Data Set Type")? != NO_DATA_SET,
        }),
        field::C_CANCEL_RQ => Request::Cancel {
            message_id: fields.u16(0x0120, "Message ID Being Responded To").ok(),
        },
        other => Request::Other {
            command_field: other,
            message_id: fields.u16(0x0110, "Message ID").ok(),
        },
    })
}

/// The elements of a command set, as slices of the received bytes.
struct CommandFields<'a> {
    elements: Vec<(u16, &'a [u8])>,
}

impl<'a> CommandFields<'a> {
    fn scan(mut bytes: &'a [u8]) -> Result<Self, CommandError> {
        let mut elements = Vec::new();
        while !bytes.is_empty() {
            // Command sets are always Implicit VR Little Endian (PS3.7 6.3.1).
            let header =
                element::read_header(bytes, Encoding::IMPLICIT_LE).ok_or(CommandError::Decode)?;
            if header.group != 0x0000 {
                return Err(CommandError::Decode);
            }
            let (value, rest) = bytes
                .get(header.header_len..)
                .and_then(|b| b.split_at_checked(header.len as usize))
                .ok_or(CommandError::Decode)?;
            elements.push((header.element, value));
            bytes = rest;
        }
        Ok(Self { elements })
    }

    fn get(&self, element: u16) -> Option<&'a [u8]> {
        self.elements
            .iter()
            .find(|(e, _)| *e == element)
            .map(|(_, v)| *v)
    }

    fn u16(&self, element: u16, name: &'static str) -> Result<u16, CommandError> {
        match self.get(element) {
            Some([lo, hi]) => Ok(u16::from_le_bytes([*lo, *hi])),
            _ => Err(CommandError::Missing(name)),
        }
    }

    fn uid(&self, element: u16, name: &'static str) -> Result<String, CommandError> {
        let value = self.get(element).ok_or(CommandError::Missing(name))?;
        let text = std::str::from_utf8(value).map_err(|_| CommandError::Decode)?;
        let uid = text.trim_end_matches(['\0', ' ']);
        if uid.is_empty() || uid.len() > 64 || !uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(CommandError::Missing(name));
        }
        Ok(uid.to_string())
    }
}

/// Encodes a C-ECHO-RSP.
pub fn echo_response(message_id: u16, sop_class_uid: &str) -> Vec<u8> {
    encode(InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            uid_value(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [field::C_ECHO_RSP]),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [NO_DATA_SET]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status::SUCCESS])),
    ]))
}

/// Encodes a C-STORE-RSP. `comment` goes into Error Comment and must not hold patient data.
pub fn store_response(req: &StoreRequest, status: u16, comment: Option<&str>) -> Vec<u8> {
    let mut elements = response_elements(
        &req.sop_class_uid,
        field::C_STORE_RSP,
        req.message_id,
        NO_DATA_SET,
        status,
    );
    elements.push(DataElement::new(
        tags::AFFECTED_SOP_INSTANCE_UID,
        VR::UI,
        uid_value(&req.sop_instance_uid),
    ));
    finish_response(elements, comment)
}

/// Encodes a C-FIND-RSP; `has_identifier` for pending responses. `comment` goes into Error
/// Comment (failures only) and must not hold patient data.
pub fn find_response(
    req: &FindRequest,
    status: u16,
    has_identifier: bool,
    comment: Option<&str>,
) -> Vec<u8> {
    let data_set_type = if has_identifier { 0x0000 } else { NO_DATA_SET };
    let elements = response_elements(
        &req.sop_class_uid,
        field::C_FIND_RSP,
        req.message_id,
        data_set_type,
        status,
    );
    finish_response(elements, comment)
}

/// The elements every response command set starts with.
fn response_elements(
    sop_class_uid: &str,
    command_field: u16,
    message_id: u16,
    data_set_type: u16,
    status: u16,
) -> Vec<DataElement<InMemDicomObject>> {
    vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            uid_value(sop_class_uid),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            dicom_value!(U16, [command_field]),
        ),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [message_id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [data_set_type]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status])),
    ]
}

/// Adds Error Comment (LO: at most 64 characters) and encodes the command set.
fn finish_response(
    mut elements: Vec<DataElement<InMemDicomObject>>,
    comment: Option<&str>,
) -> Vec<u8> {
    if let Some(text) = comment {
        let text: String = text.chars().take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(text),
        ));
    }
    encode(InMemDicomObject::command_from_element_iter(elements))
}

fn uid_value(uid: &str) -> PrimitiveValue {
    let mut s = uid.to_string();
    if s.len() % 2 == 1 {
        s.push('\0');
    }
    PrimitiveValue::from(s)
}

fn encode(obj: InMemDicomObject) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let ts = IMPLICIT_VR_LITTLE_ENDIAN.erased();
    // Writing a command set of fixed, valid elements into a Vec cannot fail.
    if obj.write_dataset_with_ts(&mut out, &ts).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store_rq(message_id: u16) -> Vec<u8> {
        store_request(message_id, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4")
    }

    #[test]
    fn store_request_decodes_with_its_message_id() {
        let Request::Store(req) = decode(&store_rq(4711)).unwrap() else {
            panic!("not a store")
        };
        assert_eq!(req.message_id, 4711);
        assert_eq!(req.sop_instance_uid, "1.2.3.4");
        assert!(req.has_data_set);
    }

    #[test]
    fn store_response_echoes_message_id_and_status() {
        let Request::Store(req) = decode(&store_rq(9)).unwrap() else {
            panic!()
        };
        let rsp = store_response(&req, status::OUT_OF_RESOURCES, Some("spool full"));
        let obj = InMemDicomObject::read_dataset_with_ts(
            rsp.as_slice(),
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        assert_eq!(
            obj.element(tags::MESSAGE_ID_BEING_RESPONDED_TO)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            9
        );
        assert_eq!(
            obj.element(tags::STATUS).unwrap().to_int::<u16>().unwrap(),
            0xA700
        );
        assert_eq!(
            obj.element(tags::COMMAND_FIELD)
                .unwrap()
                .to_int::<u16>()
                .unwrap(),
            0x8001
        );
        let len = obj
            .element(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .to_int::<u32>()
            .unwrap();
        assert_eq!(
            len as usize,
            rsp.len() - 12,
            "group length counts the bytes after it"
        );
    }

    #[test]
    fn element_claiming_more_bytes_than_sent_is_refused_without_allocating_it() {
        // Tag (5050,5050), length 0xCB0A0050: 3.4 GB claimed, 8 bytes sent.
        let bytes = [0x50, 0x50, 0x50, 0x50, 0x50, 0x00, 0x0A, 0xCB];
        assert_eq!(decode(&bytes), Err(CommandError::Decode));
    }

    #[test]
    fn find_and_cancel_requests_decode() {
        let find = encode(InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                uid_value("1.2.840.10008.5.1.4.31"),
            ),
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                dicom_value!(U16, [field::C_FIND_RQ]),
            ),
            DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [7])),
            DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [2])),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                dicom_value!(U16, [0x0102]),
            ),
        ]));
        let Request::Find(req) = decode(&find).unwrap() else {
            panic!("not a find")
        };
        assert_eq!(
            (req.message_id, req.priority, req.has_data_set),
            (7, 2, true)
        );
        assert_eq!(req.sop_class_uid, "1.2.840.10008.5.1.4.31");
        let rsp = find_response(&req, status::PENDING, true, None);
        assert!(matches!(
            decode(&rsp),
            Ok(Request::Other {
                command_field: field::C_FIND_RSP,
                ..
            })
        ));
        let cancel = encode(InMemDicomObject::command_from_element_iter([
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                dicom_value!(U16, [field::C_CANCEL_RQ]),
            ),
            DataElement::new(
                tags::MESSAGE_ID_BEING_RESPONDED_TO,
                VR::US,
                dicom_value!(U16, [7]),
            ),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                dicom_value!(U16, [NO_DATA_SET]),
            ),
        ]));
        assert_eq!(
            decode(&cancel).unwrap(),
            Request::Cancel {
                message_id: Some(7)
            }
        );
    }

    #[test]
    fn store_request_round_trips_and_response_decodes() {
        let rq = store_request(300, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45");
        let Request::Store(req) = decode(&rq).unwrap() else {
            panic!("not a store")
        };
        assert_eq!(req.message_id, 300);
        assert_eq!(req.sop_class_uid, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(req.sop_instance_uid, "1.2.3.45");
        assert!(req.has_data_set);
        let rsp = decode_response(&store_response(&req, 0xB000, None)).unwrap();
        assert_eq!(
            rsp,
            Response {
                command_field: field::C_STORE_RSP,
                message_id_being_responded_to: 300,
                status: 0xB000,
                sop_instance_uid: Some("1.2.3.45".into()),
                has_data_set: false,
            }
        );
        assert_eq!(
            decode_response(&rq),
            Err(CommandError::Missing("Message ID Being Responded To"))
        );
    }

    #[test]
    fn garbage_does_not_decode() {
        assert!(decode(&[0xFF; 40]).is_err());
        assert!(decode(&[]).is_err());
    }
}
