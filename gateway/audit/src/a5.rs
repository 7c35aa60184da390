//! Audit records as DICOM PS3.15 A.5 audit messages in RFC 5424 syslog messages.
//!
//! SKELETON: the rendering is filled in by the A.5 work; the signature is what the audit
//! export (chain -> spool -> `kind = "syslog-tls"` uplinks) calls.

use crate::Record;

/// Who is reporting: the gateway as the audit source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSource {
    /// `node.id`: AuditSourceID and the syslog HOSTNAME.
    pub node_id: String,
}

/// One RFC 5424 message (without the RFC 5425 octet count): the record's chain position is
/// `[meta sequenceId="{seq}"]`, the MSG its A.5 audit message (UTF-8 XML).
pub fn syslog_message(record: &Record, source: &AuditSource) -> Vec<u8> {
    format!(
        "<85>1 - {} gatewayd - DICOM+RFC3881 [meta sequenceId=\"{}\"] <AuditMessage/>",
        source.node_id,
        record.seq()
    )
    .into_bytes()
}
